//! The part of nth that knows Kubernetes but neither Lambda nor IMDS: what an interruption is,
//! what to do about it, and how to do it to a node.
//!
//! The Lambda (EventBridge) and the agent (IMDS) each turn their input into [`Interruption`]s,
//! ask the [`Policy`] for an [`Action`], then use [`node`] and [`drain`] against the cluster.

pub mod drain;
pub mod events;
pub mod node;
pub mod notify;
pub mod policy;
mod retry;
pub mod settings;

pub use drain::{DrainDeadline, DrainError, DrainReport, DrainSettings, Drainer};
pub use events::{Interruption, InterruptionKind, LifecycleAction};
pub use node::{MarkOutcome, NodeError, NodeMarker, RestoreOutcome};
pub use notify::{EventType, NodeEvents, Notice, Webhook, WebhookSettings};
pub use policy::{Action, Disruption, Policy, Response, TaintEffect};
