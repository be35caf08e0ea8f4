//! The normalised interruption: whatever told us (EventBridge, IMDS), this is what we act on.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why an instance is going away (or, for the last three, coming back or arriving). Each
/// disruptive kind has its own taint, so operators can tell from `kubectl describe node` what
/// happened and tolerate one kind but not another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterruptionKind {
    /// EC2 reclaims a Spot instance two minutes after the warning.
    SpotInterruption,
    /// EC2 says a Spot instance is at elevated risk of interruption.
    RebalanceRecommendation,
    /// Auto Scaling is terminating the instance (scale-in, rebalancing, warm pool) and waits
    /// on a lifecycle hook.
    AsgTermination,
    /// AWS Health announced scheduled maintenance (retirement, reboot, ...) of the instance.
    ScheduledMaintenance,
    /// The instance is stopping, stopped, shutting down or terminated.
    InstanceStopping,
    /// A capacity reservation the instance runs in is being reclaimed.
    CapacityReservationInterruption,
    /// The instance is running again (after a stop).
    InstanceRunning,
    /// Auto Scaling launched the instance and waits on a lifecycle hook for it to join.
    AsgLaunch,
    /// AWS Health closed a reboot maintenance of the instance: the reboot is over (or was
    /// cancelled) and the instance, and its node, stay.
    MaintenanceClosed,
}

impl InterruptionKind {
    pub const ALL: [Self; 9] = [
        Self::SpotInterruption,
        Self::RebalanceRecommendation,
        Self::AsgTermination,
        Self::ScheduledMaintenance,
        Self::InstanceStopping,
        Self::CapacityReservationInterruption,
        Self::InstanceRunning,
        Self::AsgLaunch,
        Self::MaintenanceClosed,
    ];

    /// The taint key suffix, after `<prefix>/`. The names match aws-node-termination-handler's,
    /// so tolerations written for it keep working when the prefix is set to its.
    pub fn taint_suffix(self) -> &'static str {
        match self {
            Self::SpotInterruption => "spot-itn",
            Self::RebalanceRecommendation => "rebalance-recommendation",
            Self::AsgTermination => "asg-lifecycle-termination",
            Self::ScheduledMaintenance => "scheduled-maintenance",
            Self::InstanceStopping => "instance-stopping",
            Self::CapacityReservationInterruption => "capacity-reservation-interruption",
            Self::InstanceRunning | Self::AsgLaunch | Self::MaintenanceClosed => "",
        }
    }

    /// The `reason` of the Kubernetes Event posted on the node.
    pub fn event_reason(self) -> &'static str {
        match self {
            Self::SpotInterruption => "SpotInterruption",
            Self::RebalanceRecommendation => "RebalanceRecommendation",
            Self::AsgTermination => "ASGLifecycleTermination",
            Self::ScheduledMaintenance => "ScheduledMaintenance",
            Self::InstanceStopping => "InstanceStopping",
            Self::CapacityReservationInterruption => "CapacityReservationInterruption",
            Self::InstanceRunning => "InstanceRunning",
            Self::AsgLaunch => "ASGLifecycleLaunch",
            Self::MaintenanceClosed => "MaintenanceClosed",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpotInterruption => "spot-interruption",
            Self::RebalanceRecommendation => "rebalance-recommendation",
            Self::AsgTermination => "asg-termination",
            Self::ScheduledMaintenance => "scheduled-maintenance",
            Self::InstanceStopping => "instance-stopping",
            Self::CapacityReservationInterruption => "capacity-reservation-interruption",
            Self::InstanceRunning => "instance-running",
            Self::AsgLaunch => "asg-launch",
            Self::MaintenanceClosed => "maintenance-closed",
        }
    }

    /// The kind whose marks this one takes back: an instance running again ends a stop, a
    /// closed reboot maintenance ends the maintenance. `None` for every kind that marks.
    pub fn restores(self) -> Option<Self> {
        match self {
            Self::InstanceRunning => Some(Self::InstanceStopping),
            Self::MaintenanceClosed => Some(Self::ScheduledMaintenance),
            Self::SpotInterruption
            | Self::RebalanceRecommendation
            | Self::AsgTermination
            | Self::ScheduledMaintenance
            | Self::InstanceStopping
            | Self::CapacityReservationInterruption
            | Self::AsgLaunch => None,
        }
    }
}

impl std::fmt::Display for InterruptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for InterruptionKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown interruption kind {s:?}; known: {}",
                    known.join(", ")
                )
            })
    }
}

/// An Auto Scaling lifecycle action waiting for our answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LifecycleAction {
    pub group: String,
    pub hook: String,
    pub token: String,
    /// `autoscaling:EC2_INSTANCE_TERMINATING` or `autoscaling:EC2_INSTANCE_LAUNCHING`.
    pub transition: String,
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
    /// The lifecycle action to complete, for Auto Scaling events.
    pub lifecycle: Option<LifecycleAction>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in InterruptionKind::ALL {
            assert_eq!(kind.as_str().parse::<InterruptionKind>(), Ok(kind));
        }
        assert!("spot".parse::<InterruptionKind>().is_err());
    }

    #[test]
    fn only_kinds_without_a_taint_restore_and_they_restore_a_kind_with_one() {
        for kind in InterruptionKind::ALL {
            if let Some(ended) = kind.restores() {
                assert_eq!(kind.taint_suffix(), "", "{kind}");
                assert_ne!(ended.taint_suffix(), "", "{kind} restores {ended}");
            }
        }
        assert_eq!(
            InterruptionKind::MaintenanceClosed.restores(),
            Some(InterruptionKind::ScheduledMaintenance)
        );
    }
}
