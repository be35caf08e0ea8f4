//! One invocation: event -> interruptions -> for each, resolve, mark, drain.

use chrono::{DateTime, TimeDelta, Utc};
use nth_core::drain::DrainDeadline;
use nth_core::node::MarkOutcome;
use nth_core::{DrainReport, Drainer, Interruption, NodeMarker, Policy};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::{info, info_span, warn, Instrument};

use crate::eventbridge::{self, EventError, Parsed};
use crate::resolve::Ec2Resolver;

/// Pods are made to stop this long before the instance is expected to go: time for the
/// container runtime to kill stragglers and for the kubelet to report them gone before EC2
/// powers the instance off.
const POD_STOP_MARGIN: TimeDelta = TimeDelta::seconds(15);

/// Kept free at the end of an invocation to log the report and answer the Runtime API;
/// a handler killed by its timeout reports nothing.
const INVOCATION_MARGIN: TimeDelta = TimeDelta::seconds(3);

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("{failed} of {total} interruptions in event {event_id} failed: {messages}")]
    Interruptions {
        event_id: String,
        failed: usize,
        total: usize,
        messages: String,
    },
}

impl HandleError {
    /// The `errorType` reported to the Lambda service.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Event(_) => "MalformedEvent",
            Self::Interruptions { .. } => "InterruptionFailed",
        }
    }
}

/// What happened to one interruption.
#[derive(Debug, Clone, Serialize)]
pub struct InterruptionResult {
    pub interruption_id: String,
    pub kind: String,
    pub instance_id: String,
    pub action: String,
    pub node: Option<String>,
    /// `drained`, `marked`, `already-marked`, `dry-run`, or why nothing was done.
    pub outcome: String,
    pub drain: Option<DrainReport>,
}

/// The invocation's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub skipped: Option<String>,
    pub results: Vec<InterruptionResult>,
}

/// What `nth-lambda explain` prints: the plan, touching nothing.
pub fn explain(event: &Value, policy: &Policy) -> Result<Value, EventError> {
    Ok(match eventbridge::parse(event)? {
        Parsed::Skipped(reason) => json!({ "interruptions": [], "skipped": reason }),
        Parsed::Interruptions(list) => json!({
            "interruptions": list.iter().map(|i| {
                let action = policy.plan(i);
                json!({
                    "id": i.id,
                    "kind": i.kind,
                    "instance_id": i.instance_id,
                    "event_time": i.event_time,
                    "deadline": i.deadline,
                    "detail": i.detail,
                    "action": action.name(),
                    "taint": action.taint,
                })
            }).collect::<Vec<_>>(),
            "skipped": Value::Null,
        }),
    })
}

/// Everything an invocation needs, built once per container and reused while warm.
#[derive(Debug)]
pub struct Handler {
    pub cluster_name: String,
    pub policy: Policy,
    pub resolver: Ec2Resolver,
    pub marker: NodeMarker,
    pub drainer: Drainer,
}

impl Handler {
    pub async fn handle(
        &self,
        event: &Value,
        invocation_end: DateTime<Utc>,
    ) -> Result<Outcome, HandleError> {
        let interruptions = match eventbridge::parse(event)? {
            Parsed::Skipped(reason) => {
                warn!(%reason, "event skipped");
                return Ok(Outcome {
                    skipped: Some(reason),
                    results: Vec::new(),
                });
            }
            Parsed::Interruptions(list) => list,
        };
        let total = interruptions.len();
        let event_id = event
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        // Interruptions of one event are independent: handle them side by side.
        let handled = futures::future::join_all(interruptions.iter().map(|interruption| {
            let span = info_span!(
                "interruption",
                event_id = %interruption.id,
                kind = %interruption.kind,
                instance_id = %interruption.instance_id,
                cluster = %self.cluster_name,
                node = tracing::field::Empty,
            );
            self.handle_one(interruption, invocation_end)
                .instrument(span)
        }))
        .await;
        let mut results = Vec::new();
        let mut failures = Vec::new();
        for result in handled {
            match result {
                Ok(r) => results.push(r),
                Err(message) => failures.push(message),
            }
        }
        if failures.is_empty() {
            Ok(Outcome {
                skipped: None,
                results,
            })
        } else {
            Err(HandleError::Interruptions {
                event_id,
                failed: failures.len(),
                total,
                messages: failures.join("; "),
            })
        }
    }

    async fn handle_one(
        &self,
        interruption: &Interruption,
        invocation_end: DateTime<Utc>,
    ) -> Result<InterruptionResult, String> {
        let action = self.policy.plan(interruption);
        let mut result = InterruptionResult {
            interruption_id: interruption.id.clone(),
            kind: interruption.kind.to_string(),
            instance_id: interruption.instance_id.clone(),
            action: action.name(),
            node: None,
            outcome: String::new(),
            drain: None,
        };
        let finish = |mut result: InterruptionResult, outcome: &str| {
            info!(outcome, action = %result.action, "interruption handled");
            result.outcome = outcome.to_owned();
            Ok(result)
        };
        if action.is_noop() {
            return finish(result, "ignored by policy");
        }
        let Some(instance) = self
            .resolver
            .describe(&interruption.instance_id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return finish(result, "instance unknown to EC2");
        };
        if let Some(other) = instance
            .cluster_from_tags()
            .filter(|c| *c != self.cluster_name)
        {
            return finish(result, &format!("instance belongs to cluster {other}"));
        }
        let Some(node) = self
            .marker
            .find(
                &interruption.instance_id,
                instance.private_dns_name.as_deref(),
            )
            .await
            .map_err(|e| e.to_string())?
        else {
            return finish(result, "no node for this instance in the cluster");
        };
        let node_name = node.metadata.name.clone().unwrap_or_default();
        tracing::Span::current().record("node", node_name.as_str());
        result.node = Some(node_name.clone());

        let marked = self
            .marker
            .mark(&node, interruption, &action)
            .await
            .map_err(|e| e.to_string())?;
        if !action.drain {
            let outcome = match marked {
                MarkOutcome::Marked => "marked",
                MarkOutcome::AlreadyMarked => "already-marked",
                MarkOutcome::DryRun => "dry-run",
            };
            return finish(result, outcome);
        }
        let deadline = drain_deadline(interruption.deadline, invocation_end);
        let report = self
            .drainer
            .drain(&node_name, deadline)
            .await
            .map_err(|e| e.to_string())?;
        let outcome = if self.policy.dry_run {
            "dry-run"
        } else if report.complete {
            "drained"
        } else {
            "drain-incomplete"
        };
        result.drain = Some(report);
        finish(result, outcome)
    }
}

fn drain_deadline(
    instance_end: Option<DateTime<Utc>>,
    invocation_end: DateTime<Utc>,
) -> DrainDeadline {
    let invocation_limit = invocation_end - INVOCATION_MARGIN;
    DrainDeadline {
        pods_stopped_by: instance_end.map(|end| end - POD_STOP_MARGIN),
        give_up_at: instance_end.map_or(invocation_limit, |end| end.min(invocation_limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_gives_up_at_the_earlier_of_instance_and_invocation_end() {
        let now = Utc::now();
        let instance = now + TimeDelta::seconds(120);
        let short_invocation = now + TimeDelta::seconds(60);
        let d = drain_deadline(Some(instance), short_invocation);
        assert_eq!(d.give_up_at, short_invocation - INVOCATION_MARGIN);
        assert_eq!(d.pods_stopped_by, Some(instance - POD_STOP_MARGIN));
        let long_invocation = now + TimeDelta::seconds(900);
        assert_eq!(
            drain_deadline(Some(instance), long_invocation).give_up_at,
            instance
        );
        assert_eq!(drain_deadline(None, long_invocation).pods_stopped_by, None);
    }

    #[test]
    fn explain_plans_without_touching_anything() {
        let event = json!({
            "id": "e1", "time": "2026-11-02T14:05:03Z", "source": "aws.ec2",
            "detail-type": "EC2 Spot Instance Interruption Warning",
            "detail": {"instance-id": "i-0b662ef9931388ba0", "instance-action": "terminate"}
        });
        let plan = explain(&event, &Policy::default()).expect("valid");
        assert_eq!(plan["skipped"], Value::Null);
        assert_eq!(plan["interruptions"][0]["action"], "taint+cordon+drain");
        assert_eq!(plan["interruptions"][0]["kind"], "spot-interruption");
        assert_eq!(plan["interruptions"][0]["deadline"], "2026-11-02T14:07:03Z");
    }
}
