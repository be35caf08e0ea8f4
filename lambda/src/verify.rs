//! What an event claims, checked against what EC2 says before anything is written. Any
//! principal allowed `lambda:InvokeFunction` on the function can send it any payload: a
//! Spot warning for an On-Demand instance, a `stopping` for a running one, a `running` for
//! one that is stopping (which would uncordon its node). EventBridge's own deliveries pass.

use nth_core::{Interruption, InterruptionKind};

use crate::resolve::InstanceInfo;

/// Why the event cannot be true of the instance as EC2 describes it; `None` when it can.
pub fn contradiction(interruption: &Interruption, instance: &InstanceInfo) -> Option<String> {
    let id = &instance.instance_id;
    match interruption.kind {
        InterruptionKind::SpotInterruption | InterruptionKind::RebalanceRecommendation => {
            let lifecycle = instance.lifecycle.as_deref().unwrap_or("on-demand");
            (lifecycle != "spot").then(|| {
                format!(
                    "a {} for instance {id}, which EC2 says is {lifecycle}, not Spot",
                    interruption.kind
                )
            })
        }
        InterruptionKind::InstanceStopping | InterruptionKind::InstanceRunning => {
            let claimed = interruption.detail.as_str();
            let actual = instance.state.as_deref().unwrap_or("unknown");
            (!state_agrees(claimed, actual)).then(|| {
                format!("the event says instance {id} is {claimed}; EC2 says it is {actual}")
            })
        }
        _ => None,
    }
}

/// Whether an instance EC2 now describes as `actual` can have been `claimed` when the event
/// was sent: the claimed state, or one that follows it on the way the event announces.
/// `running` must be current: it gives the node back, which only a running instance wants.
fn state_agrees(claimed: &str, actual: &str) -> bool {
    let following: &[&str] = match claimed {
        "running" => &["running"],
        "stopping" => &["stopping", "stopped"],
        "stopped" => &["stopped"],
        "shutting-down" => &["shutting-down", "terminated"],
        "terminated" => &["terminated"],
        _ => return true,
    };
    following.contains(&actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_event_agrees_with_the_state_or_one_after_it() {
        assert!(state_agrees("stopping", "stopped"));
        assert!(state_agrees("shutting-down", "terminated"));
        assert!(state_agrees("running", "running"));
        assert!(!state_agrees("stopping", "running"), "a forged stop");
        assert!(!state_agrees("running", "stopping"), "a forged start");
        assert!(!state_agrees("terminated", "running"));
    }
}
