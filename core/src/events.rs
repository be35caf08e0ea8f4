//! The normalised interruption: whatever told us (EventBridge, IMDS), this is what we act on.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why an instance is going away. Each kind has its own taint so that operators can tell
/// from `kubectl describe node` what happened, and tolerate one kind but not another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterruptionKind {
    /// EC2 reclaims a Spot instance two minutes after the warning.
    SpotInterruption,
}

impl InterruptionKind {
    /// The taint key suffix, after `<prefix>/`. The names match aws-node-termination-handler's,
    /// so tolerations written for it keep working when the prefix is set to its.
    pub fn taint_suffix(self) -> &'static str {
        match self {
            Self::SpotInterruption => "spot-itn",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpotInterruption => "spot-interruption",
        }
    }
}

impl std::fmt::Display for InterruptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One instance that is about to be interrupted, normalised from any source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interruption {
    /// Unique per interruption: the EventBridge event id (suffixed per instance when one event
    /// names several) or the IMDS notice's identity. Recorded on the node so a duplicate
    /// delivery is recognised.
    pub id: String,
    pub kind: InterruptionKind,
    pub instance_id: String,
    /// When the source says the interruption was announced.
    pub event_time: DateTime<Utc>,
    /// When the instance is expected to go; `None` when the source does not say.
    pub deadline: Option<DateTime<Utc>>,
    /// Free text for logs and Kubernetes events (e.g. the Spot instance-action).
    pub detail: String,
}
