//! What to do for each kind of interruption, from configuration.

use std::collections::HashMap;

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

/// What to do to a disrupted node: any of taint, cordon and drain (a drain always cordons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Disruption {
    pub taint: bool,
    pub cordon: bool,
    pub drain: bool,
}

impl Disruption {
    pub const FULL: Self = Self {
        taint: true,
        cordon: true,
        drain: true,
    };
    pub const MARK: Self = Self {
        taint: true,
        cordon: true,
        drain: false,
    };
}

/// The configured response to one kind: do nothing, or a disruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Ignore,
    Disrupt(Disruption),
}

impl std::str::FromStr for Response {
    type Err = String;

    /// `ignore`, or `+`-joined `taint`, `cordon`, `drain` (e.g. `taint+cordon+drain`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "ignore" {
            return Ok(Self::Ignore);
        }
        let mut d = Disruption {
            taint: false,
            cordon: false,
            drain: false,
        };
        for part in s.split('+') {
            match part {
                "taint" => d.taint = true,
                "cordon" => d.cordon = true,
                "drain" => {
                    d.drain = true;
                    d.cordon = true;
                }
                other => {
                    return Err(format!(
                        "unknown action {other:?} in {s:?}: expected ignore, or taint, cordon and drain joined by +"
                    ))
                }
            }
        }
        Ok(Self::Disrupt(d))
    }
}

/// What to do about one interruption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    Ignore,
    /// Cordon, taint (key given) and drain as set; cordon, taint and annotation go out as one
    /// PATCH.
    Disrupt {
        taint: Option<String>,
        cordon: bool,
        drain: bool,
    },
    /// Take nth's marks off a node that nth marked for the kind the interruption ends
    /// (`InterruptionKind::restores`: a stop, a scheduled reboot maintenance); uncordon it if
    /// the cordon was nth's.
    Restore,
    /// Wait for the instance's node to join and be Ready.
    WaitReady,
}

impl Action {
    /// A short name for logs, explain output and metrics.
    pub fn name(&self) -> String {
        match self {
            Self::Ignore => "ignore".to_owned(),
            Self::Restore => "uncordon".to_owned(),
            Self::WaitReady => "wait-ready".to_owned(),
            Self::Disrupt {
                taint,
                cordon,
                drain,
            } => {
                let parts: Vec<&str> = [
                    (taint.is_some(), "taint"),
                    (*cordon, "cordon"),
                    (*drain, "drain"),
                ]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
                if parts.is_empty() {
                    "ignore".to_owned()
                } else {
                    parts.join("+")
                }
            }
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
    /// Responses that replace the defaults, by kind.
    pub overrides: HashMap<InterruptionKind, Response>,
    /// Label a node `node.kubernetes.io/exclude-from-external-load-balancers` when its drain
    /// begins, so load balancers stop sending it traffic before its pods go.
    pub exclude_from_load_balancers: bool,
    /// Taint a fully drained node `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`
    /// when its instance is going away, so that volumes detach without waiting for the
    /// kubelet.
    pub out_of_service_taint: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            taint_effect: TaintEffect::default(),
            dry_run: false,
            overrides: HashMap::new(),
            exclude_from_load_balancers: false,
            out_of_service_taint: false,
        }
    }
}

impl Policy {
    /// The default response to each kind, as the README's event table says.
    pub fn default_response(kind: InterruptionKind) -> Option<Response> {
        use InterruptionKind as K;
        match kind {
            K::SpotInterruption
            | K::AsgTermination
            | K::ScheduledMaintenance
            | K::InstanceStopping
            | K::CapacityReservationInterruption => Some(Response::Disrupt(Disruption::FULL)),
            K::RebalanceRecommendation => Some(Response::Disrupt(Disruption::MARK)),
            K::InstanceRunning | K::AsgLaunch | K::MaintenanceClosed => None,
        }
    }

    pub fn plan(&self, interruption: &Interruption) -> Action {
        use InterruptionKind as K;
        let kind = interruption.kind;
        let response = self
            .overrides
            .get(&kind)
            .copied()
            .or_else(|| Self::default_response(kind));
        match (kind, response) {
            (_, Some(Response::Ignore)) => Action::Ignore,
            (kind, _) if kind.restores().is_some() => Action::Restore,
            (K::AsgLaunch, _) => Action::WaitReady,
            (_, Some(Response::Disrupt(d))) => Action::Disrupt {
                taint: d.taint.then(|| self.taint_key(kind)),
                cordon: d.cordon,
                drain: d.drain,
            },
            (_, None) => Action::Ignore,
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

    /// The annotation recording which interruption's drain completed on the node.
    pub fn drained_annotation(&self) -> String {
        format!("{}/drained-event-id", self.prefix)
    }

    /// The annotation listing the marks others may set too (cordon, load-balancer label,
    /// out-of-service taint) that nth set itself, so that a restore takes back only those.
    pub fn owned_annotation(&self) -> String {
        format!("{}/owned-marks", self.prefix)
    }

    /// The annotation recording which interruption's drain goes on beyond the invocation
    /// that started it, so that a duplicate delivery does not start a second one.
    pub fn continuing_annotation(&self) -> String {
        format!("{}/drain-continues-for", self.prefix)
    }

    /// The annotation holding the token of the continued drain's next round: a continuation
    /// is believed only when it carries the token its node holds, which only a principal
    /// that may annotate the node (this function's role) can have put there.
    pub fn continuation_token_annotation(&self) -> String {
        format!("{}/drain-continuation-token", self.prefix)
    }

    /// Every annotation of nth's on a node.
    pub fn annotations(&self) -> [String; 6] {
        [
            self.event_annotation(),
            self.kind_annotation(),
            self.drained_annotation(),
            self.continuing_annotation(),
            self.continuation_token_annotation(),
            self.owned_annotation(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn interruption(kind: InterruptionKind) -> Interruption {
        Interruption {
            id: "e1".into(),
            kind,
            instance_id: "i-1".into(),
            event_time: Utc::now(),
            deadline: None,
            detail: String::new(),
            lifecycle: None,
        }
    }

    #[test]
    fn spot_interruption_taints_cordons_and_drains() {
        let action = Policy::default().plan(&interruption(InterruptionKind::SpotInterruption));
        assert_eq!(
            action,
            Action::Disrupt {
                taint: Some("node-termination-handler/spot-itn".into()),
                cordon: true,
                drain: true
            }
        );
        assert_eq!(action.name(), "taint+cordon+drain");
    }

    #[test]
    fn rebalance_marks_without_draining_unless_configured() {
        let policy = Policy::default();
        let rebalance = interruption(InterruptionKind::RebalanceRecommendation);
        assert_eq!(policy.plan(&rebalance).name(), "taint+cordon");
        let draining = Policy {
            overrides: HashMap::from([(
                InterruptionKind::RebalanceRecommendation,
                "taint+cordon+drain".parse().expect("valid"),
            )]),
            ..Policy::default()
        };
        assert_eq!(draining.plan(&rebalance).name(), "taint+cordon+drain");
    }

    #[test]
    fn running_restores_launch_waits_and_both_can_be_ignored() {
        let policy = Policy::default();
        assert_eq!(
            policy.plan(&interruption(InterruptionKind::InstanceRunning)),
            Action::Restore
        );
        assert_eq!(
            policy.plan(&interruption(InterruptionKind::AsgLaunch)),
            Action::WaitReady
        );
        assert_eq!(
            policy.plan(&interruption(InterruptionKind::MaintenanceClosed)),
            Action::Restore,
            "a closed reboot maintenance takes back what its scheduling did"
        );
        let quiet = Policy {
            overrides: HashMap::from([(InterruptionKind::AsgLaunch, Response::Ignore)]),
            ..Policy::default()
        };
        assert_eq!(
            quiet.plan(&interruption(InterruptionKind::AsgLaunch)),
            Action::Ignore
        );
    }

    #[test]
    fn responses_parse_and_drain_implies_cordon() {
        assert_eq!("ignore".parse(), Ok(Response::Ignore));
        assert_eq!(
            "drain".parse(),
            Ok(Response::Disrupt(Disruption {
                taint: false,
                cordon: true,
                drain: true
            }))
        );
        assert!("evict".parse::<Response>().is_err());
    }

    #[test]
    fn prefix_keeps_nth_tolerations_working() {
        let policy = Policy {
            prefix: "aws-node-termination-handler".into(),
            ..Policy::default()
        };
        assert_eq!(
            policy.taint_key(InterruptionKind::SpotInterruption),
            "aws-node-termination-handler/spot-itn"
        );
    }

    #[test]
    fn taint_effect_parses_only_kubernetes_spellings() {
        assert_eq!("NoExecute".parse(), Ok(TaintEffect::NoExecute));
        assert!("noschedule".parse::<TaintEffect>().is_err());
    }
}
