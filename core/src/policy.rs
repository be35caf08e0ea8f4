//! What to do for each kind of interruption, from configuration.

use serde::Serialize;

use crate::events::{Interruption, InterruptionKind};

/// Default prefix of the taints and annotations nth writes. Set it to
/// `aws-node-termination-handler` to keep tolerations written for NTH working.
pub const DEFAULT_PREFIX: &str = "node-termination-handler";

/// Taint effect, as the Kubernetes API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum TaintEffect {
    #[default]
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

impl std::str::FromStr for TaintEffect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "NoSchedule" => Ok(Self::NoSchedule),
            "PreferNoSchedule" => Ok(Self::PreferNoSchedule),
            "NoExecute" => Ok(Self::NoExecute),
            other => Err(format!(
                "unknown taint effect {other:?}: expected NoSchedule, PreferNoSchedule or NoExecute"
            )),
        }
    }
}

/// What to do to a node. Cordon, taint and annotation go out as one PATCH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    /// Taint key to add, e.g. `node-termination-handler/spot-itn`; `None` for no taint.
    pub taint: Option<String>,
    pub cordon: bool,
    pub drain: bool,
}

impl Action {
    pub fn is_noop(&self) -> bool {
        self.taint.is_none() && !self.cordon && !self.drain
    }

    /// A short name for logs, explain output and metrics.
    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        if self.taint.is_some() {
            parts.push("taint");
        }
        if self.cordon {
            parts.push("cordon");
        }
        if self.drain {
            parts.push("drain");
        }
        if parts.is_empty() {
            "ignore".to_owned()
        } else {
            parts.join("+")
        }
    }
}

/// Operator settings that turn an interruption into an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub prefix: String,
    pub taint_effect: TaintEffect,
    /// Log every write instead of making it.
    pub dry_run: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            taint_effect: TaintEffect::default(),
            dry_run: false,
        }
    }
}

impl Policy {
    pub fn plan(&self, interruption: &Interruption) -> Action {
        match interruption.kind {
            InterruptionKind::SpotInterruption => Action {
                taint: Some(self.taint_key(interruption.kind)),
                cordon: true,
                drain: true,
            },
        }
    }

    pub fn taint_key(&self, kind: InterruptionKind) -> String {
        format!("{}/{}", self.prefix, kind.taint_suffix())
    }

    /// The annotation recording which interruption cordoned a node.
    pub fn event_annotation(&self) -> String {
        format!("{}/event-id", self.prefix)
    }

    /// The annotation recording the kind of interruption that cordoned a node.
    pub fn kind_annotation(&self) -> String {
        format!("{}/interruption-kind", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn spot() -> Interruption {
        Interruption {
            id: "e1".into(),
            kind: InterruptionKind::SpotInterruption,
            instance_id: "i-1".into(),
            event_time: Utc::now(),
            deadline: None,
            detail: "terminate".into(),
        }
    }

    #[test]
    fn spot_interruption_taints_cordons_and_drains() {
        let action = Policy::default().plan(&spot());
        assert_eq!(
            action.taint.as_deref(),
            Some("node-termination-handler/spot-itn")
        );
        assert!(action.cordon && action.drain);
        assert_eq!(action.name(), "taint+cordon+drain");
    }

    #[test]
    fn prefix_keeps_nth_tolerations_working() {
        let policy = Policy {
            prefix: "aws-node-termination-handler".into(),
            ..Policy::default()
        };
        assert_eq!(
            policy.plan(&spot()).taint.as_deref(),
            Some("aws-node-termination-handler/spot-itn")
        );
    }

    #[test]
    fn taint_effect_parses_only_kubernetes_spellings() {
        assert_eq!("NoExecute".parse(), Ok(TaintEffect::NoExecute));
        assert!("noschedule".parse::<TaintEffect>().is_err());
    }
}
