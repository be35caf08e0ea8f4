//! Telling people what happened: Kubernetes Events on the node, and webhook messages.

mod events;
mod webhook;

pub use events::{EventType, NodeEvents, COMPONENT};
pub use webhook::{
    Format, Notice, RedactedHeaders, RedactedUrl, Webhook, WebhookSettings, DEFAULT_TEMPLATE,
    DEFAULT_TIMEOUT,
};
