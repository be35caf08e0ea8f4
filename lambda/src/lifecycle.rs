//! Auto Scaling lifecycle actions: heartbeats while draining, then CompleteLifecycleAction.

use std::time::Duration;

use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use nth_core::LifecycleAction;
use serde::Serialize;
use tracing::{info, warn};

/// Auto Scaling's answer when the action was already completed, abandoned or timed out: for a
/// redelivered event this is the expected outcome, not a failure.
const NO_ACTIVE_ACTION: &str = "No active Lifecycle Action found";

/// The lifecycle result that lets the instance go on (terminate, or enter service).
pub const CONTINUE: &str = "CONTINUE";

/// Heartbeats sent within one heartbeat timeout of the hook, at the least: one lost to a
/// blip still leaves others before Auto Scaling gives up on the action.
const HEARTBEATS_PER_TIMEOUT: u32 = 3;

/// How long Auto Scaling waits on an action of the hook: `heartbeat_timeout` after the last
/// heartbeat, and never beyond `global_timeout` after the action began, heartbeats or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookLimits {
    pub heartbeat_timeout: Duration,
    pub global_timeout: Duration,
}

impl HookLimits {
    /// The interval between heartbeats: `configured`, or shorter when the hook's heartbeat
    /// timeout would otherwise run out between two.
    pub fn heartbeat_interval(&self, configured: Duration) -> Duration {
        configured.min(self.heartbeat_timeout / HEARTBEATS_PER_TIMEOUT)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{call} for instance {instance_id} (group {group}, hook {hook}) failed: {message}")]
    Call {
        call: &'static str,
        instance_id: String,
        group: String,
        hook: String,
        message: String,
    },
}

/// How a completion went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Completion {
    Completed,
    /// Auto Scaling has no such pending action any more: an earlier delivery completed it.
    AlreadyCompleted,
    DryRun,
}

#[derive(Debug, Clone)]
pub struct Lifecycle {
    asg: aws_sdk_autoscaling::Client,
    dry_run: bool,
    /// Between two heartbeats while draining.
    pub heartbeat_interval: Duration,
}

impl Lifecycle {
    pub fn new(
        asg: aws_sdk_autoscaling::Client,
        dry_run: bool,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            asg,
            dry_run,
            heartbeat_interval,
        }
    }

    pub async fn complete(
        &self,
        instance_id: &str,
        action: &LifecycleAction,
        result: &str,
    ) -> Result<Completion, LifecycleError> {
        if self.dry_run {
            info!(group = %action.group, hook = %action.hook, result, "dry run: would complete lifecycle action");
            return Ok(Completion::DryRun);
        }
        let outcome = self
            .asg
            .complete_lifecycle_action()
            .auto_scaling_group_name(&action.group)
            .lifecycle_hook_name(&action.hook)
            .instance_id(instance_id)
            .lifecycle_action_token(&action.token)
            .lifecycle_action_result(result)
            .send()
            .await;
        match outcome {
            Ok(_) => {
                info!(group = %action.group, hook = %action.hook, result, "lifecycle action completed");
                Ok(Completion::Completed)
            }
            Err(error)
                if error
                    .message()
                    .is_some_and(|m| m.contains(NO_ACTIVE_ACTION)) =>
            {
                info!(group = %action.group, hook = %action.hook, "lifecycle action already completed");
                Ok(Completion::AlreadyCompleted)
            }
            Err(error) => Err(self.error("CompleteLifecycleAction", instance_id, action, &error)),
        }
    }

    /// Reads the hook's limits with DescribeLifecycleHooks. `None` when they cannot be read
    /// (the role may not describe hooks, the hook is gone): the drain then keeps to
    /// MAX_DRAIN_SECONDS and the configured heartbeat interval, which the documentation asks
    /// to keep within the hook's.
    pub async fn limits(&self, instance_id: &str, action: &LifecycleAction) -> Option<HookLimits> {
        let described = self
            .asg
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(&action.group)
            .lifecycle_hook_names(&action.hook)
            .send()
            .await;
        let hooks = match described {
            Ok(output) => output,
            Err(error) => {
                let error = self.error("DescribeLifecycleHooks", instance_id, action, &error);
                warn!(%error, "the hook's timeouts are unknown; MAX_DRAIN_SECONDS alone limits the drain");
                return None;
            }
        };
        let hook = hooks
            .lifecycle_hooks()
            .iter()
            .find(|h| h.lifecycle_hook_name() == Some(action.hook.as_str()));
        let seconds = |value: Option<i32>| {
            value
                .and_then(|v| u64::try_from(v).ok())
                .filter(|v| *v > 0)
                .map(Duration::from_secs)
        };
        let limits = hook.and_then(|h| {
            Some(HookLimits {
                heartbeat_timeout: seconds(h.heartbeat_timeout())?,
                global_timeout: seconds(h.global_timeout())?,
            })
        });
        match limits {
            Some(limits) => {
                info!(group = %action.group, hook = %action.hook, heartbeat_timeout_s = limits.heartbeat_timeout.as_secs(), global_timeout_s = limits.global_timeout.as_secs(), "lifecycle hook limits read")
            }
            None => {
                warn!(group = %action.group, hook = %action.hook, "lifecycle hook not found; MAX_DRAIN_SECONDS alone limits the drain")
            }
        }
        limits
    }

    /// Why Auto Scaling cannot be waiting on this termination action: the instance is in
    /// another group, in none, or not terminating. `None` when it can, and when Auto Scaling
    /// cannot be asked (the check then gives way: a scale-in must not hang on a permission).
    /// A redelivered event finds the action already completed (`Terminating:Proceed`).
    pub async fn termination_contradiction(
        &self,
        instance_id: &str,
        action: &LifecycleAction,
    ) -> Option<String> {
        let described = self
            .asg
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let output = match described {
            Ok(output) => output,
            Err(error) => {
                let error = self.error("DescribeAutoScalingInstances", instance_id, action, &error);
                warn!(%error, "the instance's group and state could not be checked");
                return None;
            }
        };
        let Some(instance) = output
            .auto_scaling_instances()
            .iter()
            .find(|i| i.instance_id() == Some(instance_id))
        else {
            return Some(format!(
                "instance {instance_id} is in no Auto Scaling group; the event names {}",
                action.group
            ));
        };
        let group = instance.auto_scaling_group_name().unwrap_or_default();
        let state = instance.lifecycle_state().unwrap_or_default();
        if group != action.group {
            return Some(format!(
                "instance {instance_id} is in group {group}; the event names {}",
                action.group
            ));
        }
        let terminating = [
            "Terminating",
            "Terminated",
            "Warmed:Terminating",
            "Warmed:Terminated",
        ]
        .iter()
        .any(|s| state.starts_with(s));
        (!terminating).then(|| {
            format!("instance {instance_id} is {state} in group {group}: no termination waits on a hook")
        })
    }

    pub async fn heartbeat(
        &self,
        instance_id: &str,
        action: &LifecycleAction,
    ) -> Result<(), LifecycleError> {
        if self.dry_run {
            info!(group = %action.group, hook = %action.hook, "dry run: would record a lifecycle heartbeat");
            return Ok(());
        }
        self.asg
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&action.group)
            .lifecycle_hook_name(&action.hook)
            .instance_id(instance_id)
            .lifecycle_action_token(&action.token)
            .send()
            .await
            .map_err(|error| {
                self.error(
                    "RecordLifecycleActionHeartbeat",
                    instance_id,
                    action,
                    &error,
                )
            })?;
        info!(group = %action.group, hook = %action.hook, "lifecycle heartbeat recorded");
        Ok(())
    }

    /// Runs `work` while recording heartbeats every `interval`, so the hook does not time
    /// out during a long drain. A failed heartbeat is logged; the work goes on. `beat_first`
    /// sends one at once: a continued round follows an invocation's end and Lambda's
    /// queueing, a gap the previous round's last heartbeat does not cover.
    pub async fn with_heartbeats<F: std::future::Future>(
        &self,
        instance_id: &str,
        action: &LifecycleAction,
        interval: Duration,
        beat_first: bool,
        work: F,
    ) -> F::Output {
        let beater = {
            let this = self.clone();
            let instance_id = instance_id.to_owned();
            let action = action.clone();
            let span = tracing::Span::current();
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let mut ticker = tokio::time::interval(interval);
                    if !beat_first {
                        // The interval's first tick is immediate.
                        ticker.tick().await;
                    }
                    loop {
                        ticker.tick().await;
                        if let Err(error) = this.heartbeat(&instance_id, &action).await {
                            warn!(%error, "lifecycle heartbeat failed");
                        }
                    }
                },
                span,
            ))
        };
        let output = work.await;
        beater.abort();
        output
    }

    fn error<E: ProvideErrorMetadata + std::error::Error>(
        &self,
        call: &'static str,
        instance_id: &str,
        action: &LifecycleAction,
        error: &E,
    ) -> LifecycleError {
        LifecycleError::Call {
            call,
            instance_id: instance_id.to_owned(),
            group: action.group.clone(),
            hook: action.hook.clone(),
            message: match (error.code(), error.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                _ => aws_sdk_autoscaling::error::DisplayErrorContext(error).to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_come_often_enough_for_the_hooks_own_timeout() {
        let limits = HookLimits {
            heartbeat_timeout: Duration::from_secs(30),
            global_timeout: Duration::from_secs(3000),
        };
        assert_eq!(
            limits.heartbeat_interval(Duration::from_secs(60)),
            Duration::from_secs(10)
        );
        assert_eq!(
            limits.heartbeat_interval(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }
}
