//! One invocation: event -> interruptions -> for each, resolve, mark, drain.

use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use nth_core::drain::DrainDeadline;
use nth_core::node::{node_is_ready, provider_id_matches};
use nth_core::NodeError;
use nth_core::{
    Action, DrainReport, Drainer, EventType, Interruption, MarkOutcome, NodeEvents, NodeMarker,
    Notice, Policy, RestoreOutcome, Webhook,
};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::eventbridge::{self, EventError, Parsed};
use crate::lifecycle::{Lifecycle, LifecycleError, CONTINUE};
use crate::metrics::Metrics;
use crate::resolve::{ResolveError, Resolver};

/// Pods are made to stop this long before the instance is expected to go: time for the
/// container runtime to kill stragglers and for the kubelet to report them gone before EC2
/// powers the instance off.
const POD_STOP_MARGIN: TimeDelta = TimeDelta::seconds(15);

/// Kept free at the end of an invocation to log the report and answer the Runtime API;
/// a handler killed by its timeout reports nothing.
const INVOCATION_MARGIN: TimeDelta = TimeDelta::seconds(3);

/// Interruptions of one event handled at once: every one of a Health event's instances gets
/// going quickly without a thousand-instance event opening a thousand connections.
const INTERRUPTIONS_AT_ONCE: usize = 16;

/// Between two looks for a launching instance's node: a node takes a minute or more to
/// join, so a few seconds of lag cost nothing, and one GET per poll is all it costs.
const LAUNCH_POLL_INTERVAL: Duration = Duration::from_secs(5);

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
    /// What was done (`drained`, `marked`, `uncordoned`, `node-ready`, `dry-run`, ...) or why
    /// nothing was.
    pub outcome: String,
    pub drain: Option<DrainReport>,
    /// The Auto Scaling lifecycle action's fate, for lifecycle events.
    pub lifecycle: Option<String>,
    /// From the event's time to the node's cordon, when this invocation cordoned it.
    pub cordoned_after_ms: Option<u64>,
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
                let taint = match &action {
                    Action::Disrupt { taint, .. } => taint.clone(),
                    _ => None,
                };
                json!({
                    "id": i.id,
                    "kind": i.kind,
                    "instance_id": i.instance_id,
                    "event_time": i.event_time,
                    "deadline": i.deadline,
                    "detail": i.detail,
                    "action": action.name(),
                    "taint": taint,
                    "lifecycle": i.lifecycle,
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
    /// The region the function runs in; events from another region name instances it
    /// cannot see (EventBridge delivers them only through a cross-region rule).
    pub region: String,
    pub policy: Policy,
    pub managed_tag: Option<String>,
    pub resolver: Resolver,
    pub marker: NodeMarker,
    pub drainer: Drainer,
    pub lifecycle: Lifecycle,
    pub events: NodeEvents,
    /// Where EMF metrics go; `None` outside Lambda.
    pub metrics_namespace: Option<String>,
    pub webhook: Option<Webhook>,
}

/// Waits for a background webhook notice; its own timeouts bound the wait.
async fn finish_notice(handle: Option<tokio::task::JoinHandle<()>>) {
    if let Some(handle) = handle {
        let _sent_or_logged = handle.await;
    }
}

/// A step that failed, for the invocation's error and the error metric.
#[derive(Debug)]
pub struct StepError {
    /// `resolve`, `node`, `drain` or `lifecycle`.
    pub stage: &'static str,
    pub message: String,
}

impl StepError {
    fn new(stage: &'static str, error: &dyn std::fmt::Display) -> Self {
        Self {
            stage,
            message: error.to_string(),
        }
    }
}

impl From<ResolveError> for StepError {
    fn from(e: ResolveError) -> Self {
        Self::new("resolve", &e)
    }
}

impl From<NodeError> for StepError {
    fn from(e: NodeError) -> Self {
        Self::new("node", &e)
    }
}

impl From<LifecycleError> for StepError {
    fn from(e: LifecycleError) -> Self {
        Self::new("lifecycle", &e)
    }
}

impl Handler {
    pub async fn handle(
        &self,
        event: &Value,
        invocation_end: DateTime<Utc>,
    ) -> Result<Outcome, HandleError> {
        let parsed = match eventbridge::parse(event) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.emit_metrics(&Metrics::parse_error());
                return Err(error.into());
            }
        };
        let event_region = event
            .get("region")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty());
        let parsed = match (parsed, event_region) {
            (Parsed::Interruptions(_), Some(region)) if region != self.region => {
                Parsed::Skipped(format!(
                    "event from region {region}; this function serves {}",
                    self.region
                ))
            }
            (parsed, _) => parsed,
        };
        let interruptions = match parsed {
            Parsed::Skipped(reason) => {
                warn!(%reason, "event skipped");
                self.emit_metrics(&Metrics::from_results("skipped", &[], &[]));
                return Ok(Outcome {
                    skipped: Some(reason),
                    results: Vec::new(),
                });
            }
            Parsed::Interruptions(list) => list,
        };
        let kind = interruptions
            .first()
            .map(|i| i.kind.as_str())
            .unwrap_or_default();
        let total = interruptions.len();
        let event_id = event
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let spans: Vec<tracing::Span> = interruptions
            .iter()
            .map(|interruption| {
                info_span!(
                    "interruption",
                    event_id = %interruption.id,
                    kind = %interruption.kind,
                    instance_id = %interruption.instance_id,
                    cluster = %self.cluster_name,
                    node = tracing::field::Empty,
                )
            })
            .collect();
        // Interruptions of one event are independent: handle them side by side, a bounded
        // number at a time (a Health event may name many instances). Every node is marked
        // before any is drained, so that pods evicted from one do not land on the next.
        let prepared: Vec<_> = futures::stream::iter(interruptions.iter().zip(&spans).map(
            |(interruption, span)| {
                self.prepare(interruption, invocation_end)
                    .instrument(span.clone())
            },
        ))
        .buffered(INTERRUPTIONS_AT_ONCE)
        .collect()
        .await;
        let handled: Vec<_> =
            futures::stream::iter(interruptions.iter().zip(prepared).zip(&spans).map(
                |((interruption, prepared), span)| {
                    self.finish(interruption, prepared, invocation_end)
                        .instrument(span.clone())
                },
            ))
            .buffer_unordered(INTERRUPTIONS_AT_ONCE)
            .collect()
            .await;
        let mut results = Vec::new();
        let mut failures = Vec::new();
        for result in handled {
            match result {
                Ok(r) => results.push(r),
                Err(failure) => failures.push(failure),
            }
        }
        self.emit_metrics(&Metrics::from_results(kind, &results, &failures));
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
                messages: failures
                    .iter()
                    .map(|f| f.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        }
    }

    /// Writes the invocation's EMF line to standard output, where Lambda's log capture
    /// takes it to CloudWatch Logs; off outside Lambda (standard output is the result there).
    fn emit_metrics(&self, metrics: &Metrics) {
        if let Some(namespace) = &self.metrics_namespace {
            println!(
                "{}",
                metrics.to_emf(namespace, Utc::now().timestamp_millis())
            );
        }
    }

    /// Everything up to the drain: resolve the instance, find and mark the node.
    async fn prepare(
        &self,
        interruption: &Interruption,
        invocation_end: DateTime<Utc>,
    ) -> Result<(InterruptionResult, Prepared), StepError> {
        let action = self.policy.plan(interruption);
        let mut result = InterruptionResult {
            interruption_id: interruption.id.clone(),
            kind: interruption.kind.to_string(),
            instance_id: interruption.instance_id.clone(),
            action: action.name(),
            node: None,
            outcome: String::new(),
            drain: None,
            lifecycle: None,
            cordoned_after_ms: None,
        };
        let prepared = self
            .act(interruption, &action, invocation_end, &mut result)
            .await?;
        Ok((result, prepared))
    }

    /// The drain, if one is due, then the lifecycle action and the record of the outcome.
    async fn finish(
        &self,
        interruption: &Interruption,
        prepared: Result<(InterruptionResult, Prepared), StepError>,
        invocation_end: DateTime<Utc>,
    ) -> Result<InterruptionResult, StepError> {
        let (mut result, prepared) = prepared?;
        let step = match prepared {
            Prepared::Finished(step) => step,
            Prepared::Drain {
                node,
                cordon_notice,
            } => {
                self.drain_node(
                    interruption,
                    &node,
                    cordon_notice,
                    invocation_end,
                    &mut result,
                )
                .await?
            }
        };
        // Whatever happened to the node, including a failed drain, a lifecycle action of ours
        // is answered: scale-in and scale-out must never hang on nth. Instances that are not
        // ours are left to their own handler; a launch whose node never became Ready is left
        // to the hook's default result.
        if let Some(lifecycle) = &interruption.lifecycle {
            result.lifecycle = Some(match &step {
                Step::NotOurs(_) => "not completed: not this deployment's instance".to_owned(),
                Step::NeverJoined(why) => {
                    format!("not completed: {why}; the hook's default result applies")
                }
                Step::Done(_) | Step::DrainFailed(_) => {
                    let completion = self
                        .lifecycle
                        .complete(&interruption.instance_id, lifecycle, CONTINUE)
                        .await?;
                    json!(completion).as_str().unwrap_or_default().to_owned()
                }
            });
        }
        let what = match step {
            Step::Done(what) | Step::NotOurs(what) | Step::NeverJoined(what) => what,
            Step::DrainFailed(error) => return Err(StepError::new("drain", &error)),
        };
        info!(outcome = %what, action = %result.action, lifecycle = result.lifecycle.as_deref().unwrap_or("none"), "interruption handled");
        result.outcome = what;
        Ok(result)
    }

    /// Resolves the instance and acts on its node, up to the drain.
    async fn act(
        &self,
        interruption: &Interruption,
        action: &Action,
        invocation_end: DateTime<Utc>,
        result: &mut InterruptionResult,
    ) -> Result<Prepared, StepError> {
        if *action == Action::Ignore {
            return Ok(Prepared::from(Step::Done("ignored by policy".into())));
        }
        let Some(instance) = self.resolver.describe(&interruption.instance_id).await? else {
            return Ok(Prepared::from(Step::Done("instance unknown to EC2".into())));
        };
        if let Some(other) = instance
            .cluster_from_tags()
            .filter(|c| *c != self.cluster_name)
        {
            return Ok(Prepared::from(Step::NotOurs(format!(
                "instance belongs to cluster {other}"
            ))));
        }
        if let Some(tag) = &self.managed_tag {
            if !self.resolver.is_managed(&instance, tag).await? {
                return Ok(Prepared::from(Step::NotOurs(format!(
                    "instance and its group lack the managed tag {tag}"
                ))));
            }
        }
        let likely_name = instance.private_dns_name.as_deref();
        if *action == Action::WaitReady {
            return self
                .wait_ready(interruption, likely_name, invocation_end, result)
                .await
                .map(Prepared::from);
        }
        let Some(node) = self
            .marker
            .find(&interruption.instance_id, likely_name)
            .await?
        else {
            return Ok(Prepared::from(Step::Done(
                "no node for this instance in the cluster".into(),
            )));
        };
        let node_name = node.metadata.name.clone().unwrap_or_default();
        tracing::Span::current().record("node", node_name.as_str());
        result.node = Some(node_name.clone());

        let Action::Disrupt {
            taint,
            cordon,
            drain,
        } = action
        else {
            let restored = self.marker.restore(&node).await?;
            if restored == RestoreOutcome::Restored {
                let message = format!(
                    "Instance {} is running again (event {}): uncordoned and untainted",
                    interruption.instance_id, interruption.id
                );
                self.events
                    .emit(&node, EventType::Normal, "Uncordoned", &message)
                    .await;
            }
            return Ok(Prepared::from(Step::Done(
                match restored {
                    RestoreOutcome::Restored => "uncordoned",
                    RestoreOutcome::NotOurs => "not cordoned by nth for a stop; left alone",
                    RestoreOutcome::DryRun => "dry-run",
                }
                .into(),
            )));
        };
        let marked = self
            .marker
            .mark(&node, interruption, taint.as_deref(), *cordon, *drain)
            .await?;
        let mut cordon_notice = None;
        if marked == MarkOutcome::Marked {
            cordon_notice = self.notify(self.notice(interruption, &node_name, &action.name()));
            result.cordoned_after_ms =
                u64::try_from((Utc::now() - interruption.event_time).num_milliseconds()).ok();
            self.events
                .interruption(&node, interruption, &action.name())
                .await;
        }
        if !drain {
            finish_notice(cordon_notice).await;
            return Ok(Prepared::from(Step::Done(
                match marked {
                    MarkOutcome::Marked => "marked",
                    MarkOutcome::AlreadyMarked => "already-marked",
                    MarkOutcome::DryRun => "dry-run",
                }
                .into(),
            )));
        }
        if self.marker.drained_for(&node, interruption) {
            info!(node = %node_name, "this interruption's drain already completed; not draining again");
            finish_notice(cordon_notice).await;
            return Ok(Prepared::from(Step::Done("already-drained".into())));
        }
        Ok(Prepared::Drain {
            node: Box::new(node),
            cordon_notice,
        })
    }

    /// Drains a marked node, reports the outcome and records a complete drain on the node.
    async fn drain_node(
        &self,
        interruption: &Interruption,
        node: &Node,
        cordon_notice: Option<tokio::task::JoinHandle<()>>,
        invocation_end: DateTime<Utc>,
        result: &mut InterruptionResult,
    ) -> Result<Step, StepError> {
        let node_name = node.metadata.name.clone().unwrap_or_default();
        let deadline = drain_deadline(interruption.deadline, invocation_end);
        let drained = match &interruption.lifecycle {
            Some(lifecycle) => {
                self.lifecycle
                    .with_heartbeats(
                        &interruption.instance_id,
                        lifecycle,
                        self.drainer.drain(&node_name, deadline),
                    )
                    .await
            }
            None => self.drainer.drain(&node_name, deadline).await,
        };
        let report = match drained {
            Ok(report) => report,
            Err(error) => {
                warn!(%error, "drain failed");
                return Ok(Step::DrainFailed(error.to_string()));
            }
        };
        if !self.policy.dry_run {
            self.events.drain_outcome(node, interruption, &report).await;
        }
        let outcome = if self.policy.dry_run {
            "dry-run"
        } else if report.complete {
            self.marker.record_drained(&node_name, interruption).await?;
            "drained"
        } else {
            if interruption.lifecycle.is_some() {
                warn!(
                    left = report.left.len(),
                    "drain incomplete at its deadline; completing the lifecycle action anyway"
                );
            }
            "drain-incomplete"
        };
        finish_notice(cordon_notice).await;
        finish_notice(self.notify(Notice {
            outcome: Some(outcome.to_owned()),
            evicted: Some(report.evicted.len()),
            left: Some(report.left.len()),
            ..self.notice(interruption, &node_name, &format!("drain {outcome}"))
        }))
        .await;
        result.drain = Some(report);
        Ok(Step::Done(outcome.into()))
    }

    fn notice(&self, interruption: &Interruption, node: &str, description: &str) -> Notice {
        Notice {
            event_id: interruption.id.clone(),
            kind: interruption.kind.to_string(),
            instance_id: interruption.instance_id.clone(),
            node: node.to_owned(),
            cluster: self.cluster_name.clone(),
            start_time: interruption.event_time,
            description: description.to_owned(),
            outcome: None,
            evicted: None,
            left: None,
        }
    }

    /// Sends a webhook notice in the background, so that a slow receiver never holds up
    /// the drain; the handle is awaited before the invocation ends (Lambda freezes what is
    /// still running when it answers).
    fn notify(&self, notice: Notice) -> Option<tokio::task::JoinHandle<()>> {
        let hook = self.webhook.clone()?;
        Some(tokio::spawn(
            async move { hook.send(&notice).await }.instrument(tracing::Span::current()),
        ))
    }

    /// For a launching instance: waits until its node has joined and is Ready, bounded by the
    /// invocation's end, looking it up by name once per poll interval.
    async fn wait_ready(
        &self,
        interruption: &Interruption,
        likely_name: Option<&str>,
        invocation_end: DateTime<Utc>,
        result: &mut InterruptionResult,
    ) -> Result<Step, StepError> {
        let give_up = invocation_end - INVOCATION_MARGIN;
        loop {
            let node = match likely_name {
                Some(name) => self.marker.get(name).await,
                None => self.marker.find(&interruption.instance_id, None).await,
            }?;
            let joined = node.filter(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.provider_id.as_deref())
                    .is_none_or(|p| provider_id_matches(p, &interruption.instance_id))
            });
            if let Some(node) = &joined {
                let name = node.metadata.name.clone().unwrap_or_default();
                tracing::Span::current().record("node", name.as_str());
                result.node = Some(name);
                if node_is_ready(node) {
                    return Ok(Step::Done("node-ready".into()));
                }
            }
            let next = Utc::now() + TimeDelta::from_std(LAUNCH_POLL_INTERVAL).unwrap_or_default();
            if next >= give_up {
                let why = if joined.is_some() {
                    "node joined but never turned Ready before the invocation's end"
                } else {
                    "node never joined before the invocation's end"
                };
                warn!(
                    reason = why,
                    "launch lifecycle action left to its default result"
                );
                return Ok(Step::NeverJoined(why.to_owned()));
            }
            tokio::time::sleep(LAUNCH_POLL_INTERVAL).await;
        }
    }
}

/// Where an interruption stands after its node was marked.
enum Prepared {
    Finished(Step),
    /// The node is marked; its drain comes once every node of the event is marked.
    Drain {
        node: Box<Node>,
        cordon_notice: Option<tokio::task::JoinHandle<()>>,
    },
}

impl From<Step> for Prepared {
    fn from(step: Step) -> Self {
        Self::Finished(step)
    }
}

/// How acting on one interruption ended.
enum Step {
    /// Handled (or nothing to do); the outcome in words.
    Done(String),
    /// Not this deployment's instance: no write anywhere, no lifecycle completion.
    NotOurs(String),
    /// A launching instance's node did not become Ready in time.
    NeverJoined(String),
    /// The drain could not run; the invocation fails (after any lifecycle completion) so
    /// that Lambda retries it.
    DrainFailed(String),
}

/// When the drain must end. An instance end already in the past (an old event retried from
/// the dead-letter queue, a skewed clock) says nothing reliable about the instance: the drain
/// then runs as if the end were unknown, instead of killing every pod with no grace.
fn drain_deadline(
    instance_end: Option<DateTime<Utc>>,
    invocation_end: DateTime<Utc>,
) -> DrainDeadline {
    let instance_end = instance_end.filter(|end| *end > Utc::now());
    if instance_end.is_none() {
        debug!("no usable instance deadline; pods keep their own grace periods");
    }
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
        // A deadline already past is ignored rather than turned into zero grace.
        let stale = drain_deadline(Some(now - TimeDelta::hours(3)), long_invocation);
        assert_eq!(stale.pods_stopped_by, None);
        assert_eq!(stale.give_up_at, long_invocation - INVOCATION_MARGIN);
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
