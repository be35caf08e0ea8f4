//! One invocation: event -> interruptions -> for each, resolve, mark, drain.

use chrono::{DateTime, TimeDelta, Utc};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use nth_core::drain::DrainDeadline;
use nth_core::node::{node_is_ready, provider_id_matches};
use nth_core::NodeError;
use nth_core::{
    Action, DrainReport, EventType, Interruption, InterruptionKind, MarkOutcome, Notice, Policy,
    RestoreOutcome, Webhook,
};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::budget::{self, Overrun, WRAP_UP};
use crate::clusters::{Choice, Cluster, Clusters, LookupError};
use crate::continuation::{self, Continuation};
use crate::eventbridge::{self, EventError, Parsed};
use crate::lifecycle::{Lifecycle, LifecycleError, CONTINUE};
use crate::metrics::Metrics;
use crate::resolve::{ResolveError, Resolver};
use crate::verify;

/// Pods are made to stop this long before the instance is expected to go: time for the
/// container runtime to kill stragglers and for the kubelet to report them gone before EC2
/// powers the instance off.
const POD_STOP_MARGIN: TimeDelta = TimeDelta::seconds(15);

/// Interruptions of one event handled at once: every one of a Health event's instances gets
/// going quickly without a thousand-instance event opening a thousand connections.
const INTERRUPTIONS_AT_ONCE: usize = 16;

/// Between two looks for a launching instance's node: a node takes a minute or more to
/// join, so a few seconds of lag cost nothing, and one GET per poll is all it costs.
const LAUNCH_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Before asking EC2 again about a state an event claims and EC2 does not show: its API is
/// eventually consistent, and a state change is visible there within a second or two.
const STATE_SETTLE: Duration = Duration::from_secs(2);

/// Of the launch polls, one in this many also lists nodes to find one named otherwise than
/// its PrivateDnsName: every 30 s, a lag nobody waiting a minute for a node notices.
const LAUNCH_LISTS_EVERY: u32 = 6;

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
                    "restores": i.kind.restores(),
                    "taint": taint,
                    "lifecycle": i.lifecycle,
                })
            }).collect::<Vec<_>>(),
            "skipped": Value::Null,
        }),
    })
}

/// The invocation being served, as the Lambda service describes it.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// When Lambda stops the function.
    pub end: DateTime<Utc>,
    /// This function's ARN, to continue a long drain in a new invocation; `None` outside
    /// Lambda, where a drain never continues.
    pub function_arn: Option<String>,
}

impl Invocation {
    /// The account the function runs in, from its ARN.
    pub fn account(&self) -> Option<&str> {
        self.function_arn
            .as_deref()?
            .split(':')
            .nth(4)
            .filter(|a| !a.is_empty())
    }
}

/// One payload's handling.
struct Run<'a> {
    invocation: &'a Invocation,
    /// The EventBridge event, as first delivered.
    event: &'a Value,
    /// When the drain began, in the first invocation of a continued one.
    drain_started: DateTime<Utc>,
    continuation: Option<&'a Continuation>,
    /// Webhook notices on their way, awaited before the invocation answers: Lambda freezes
    /// whatever still runs once it has.
    notices: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Run<'_> {
    /// Keeps a notice on its way until the invocation's end.
    fn keep(&self, notice: Option<tokio::task::JoinHandle<()>>) {
        if let Some(handle) = notice {
            self.notices
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(handle);
        }
    }

    /// Waits for the notices on their way, until the answer is due; one still unsent then
    /// is dropped (its receiver is slow or gone; the drain does not wait for it).
    async fn flush_notices(&self) {
        let handles = std::mem::take(
            &mut *self
                .notices
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if handles.is_empty() {
            return;
        }
        let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
        let left = (budget::answer_by(self.invocation.end) - Utc::now())
            .to_std()
            .unwrap_or_default();
        if tokio::time::timeout(left, futures::future::join_all(handles))
            .await
            .is_err()
        {
            warn!(
                unsent = aborts.iter().filter(|a| !a.is_finished()).count(),
                "webhook notices still unsent when the invocation must answer; dropped"
            );
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }
}

/// Everything an invocation needs, built once per container and reused while warm.
#[derive(Debug)]
pub struct Handler {
    pub clusters: Clusters,
    /// The region the function runs in; events from another region name instances it
    /// cannot see (EventBridge delivers them only through a cross-region rule).
    pub region: String,
    pub policy: Policy,
    pub managed_tag: Option<String>,
    /// Nodes carrying Karpenter's node pool label are Karpenter's to handle.
    pub leave_karpenter_nodes: bool,
    /// Between a termination hook's drain and its completion (load balancers deregistering
    /// the instance); the drain ends this much earlier in the invocation to leave room.
    pub completion_delay: Duration,
    pub resolver: Resolver,
    pub lifecycle: Lifecycle,
    /// Where EMF metrics go; `None` outside Lambda.
    pub metrics_namespace: Option<String>,
    pub webhook: Option<Webhook>,
    /// Why the configured webhook could not be set up, if it could not: the function works
    /// without it, and says so in every invocation's log and metrics.
    pub webhook_unavailable: Option<String>,
    /// For the calls made without an SDK client (continuing a drain).
    pub aws: aws_config::SdkConfig,
    /// How long one node's drain may go on across invocations (MAX_DRAIN_SECONDS).
    pub max_drain: TimeDelta,
}

/// A step that failed, for the invocation's error and the error metric.
#[derive(Debug)]
pub struct StepError {
    /// `resolve`, `node`, `drain`, `lifecycle` or `wrap-up` (a step after the drain overran).
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

impl From<LookupError> for StepError {
    fn from(e: LookupError) -> Self {
        Self::new("resolve", &e)
    }
}

impl From<NodeError> for StepError {
    fn from(e: NodeError) -> Self {
        Self::new("node", &e)
    }
}

impl From<Overrun> for StepError {
    fn from(e: Overrun) -> Self {
        Self::new("wrap-up", &e)
    }
}

impl From<LifecycleError> for StepError {
    fn from(e: LifecycleError) -> Self {
        Self::new("lifecycle", &e)
    }
}

impl Handler {
    /// Handles one payload: an EventBridge event, or a drain continued from an earlier
    /// invocation.
    pub async fn handle(
        &self,
        payload: &Value,
        invocation: &Invocation,
    ) -> Result<Outcome, HandleError> {
        let continuation = Continuation::from_payload(payload)?;
        let event = continuation.as_ref().map_or(payload, |c| &c.event);
        let run = Run {
            invocation,
            event,
            drain_started: continuation.as_ref().map_or_else(Utc::now, |c| c.started),
            continuation: continuation.as_ref(),
            notices: std::sync::Mutex::default(),
        };
        let parsed = match eventbridge::parse(event) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.emit_metrics(Metrics::parse_error());
                return Err(error.into());
            }
        };
        let parsed = match parsed {
            Parsed::Interruptions(_) => match self.foreign(event, invocation) {
                Some(reason) => Parsed::Skipped(reason),
                None => parsed,
            },
            skipped => skipped,
        };
        let interruptions = match parsed {
            Parsed::Skipped(reason) => {
                warn!(%reason, "event skipped");
                self.emit_metrics(Metrics::from_results("skipped", &[], &[]));
                return Ok(Outcome {
                    skipped: Some(reason),
                    results: Vec::new(),
                });
            }
            // A continuation carries on one instance's drain, not the whole event again.
            Parsed::Interruptions(list) => list
                .into_iter()
                .filter(|i| {
                    run.continuation
                        .is_none_or(|c| c.instance_id == i.instance_id)
                })
                .collect::<Vec<_>>(),
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
                    cluster = tracing::field::Empty,
                    node = tracing::field::Empty,
                )
            })
            .collect();
        // Interruptions of one event are independent: handle them side by side, a bounded
        // number at a time (a Health event may name many instances). Every node is marked
        // before any is drained, so that pods evicted from one do not land on the next.
        let prepared: Vec<_> = futures::stream::iter(
            interruptions
                .iter()
                .zip(&spans)
                .map(|(interruption, span)| {
                    self.prepare(interruption, &run).instrument(span.clone())
                }),
        )
        .buffered(INTERRUPTIONS_AT_ONCE)
        .collect()
        .await;
        let handled: Vec<_> =
            futures::stream::iter(interruptions.iter().zip(prepared).zip(&spans).map(
                |((interruption, prepared), span)| {
                    self.finish(interruption, prepared, &run)
                        .instrument(span.clone())
                },
            ))
            .buffer_unordered(INTERRUPTIONS_AT_ONCE)
            .collect()
            .await;
        run.flush_notices().await;
        let mut results = Vec::new();
        let mut failures = Vec::new();
        for result in handled {
            match result {
                Ok(r) => results.push(r),
                Err(failure) => failures.push(failure),
            }
        }
        self.emit_metrics(Metrics::from_results(kind, &results, &failures));
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

    /// Why an event is not this function's to act on: it comes from another region or
    /// account (through a cross-region or cross-account rule), and names instances this
    /// function's role cannot see.
    fn foreign(&self, event: &Value, invocation: &Invocation) -> Option<String> {
        let field = |name: &str| {
            event
                .get(name)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
        };
        if let Some(region) = field("region").filter(|r| *r != self.region) {
            return Some(format!(
                "event from region {region}; this function serves {}",
                self.region
            ));
        }
        let ours = invocation.account()?;
        field("account")
            .filter(|account| *account != ours)
            .map(|account| format!("event from account {account}; this function serves {ours}"))
    }

    /// Writes the invocation's EMF line to standard output, where Lambda's log capture
    /// takes it to CloudWatch Logs; off outside Lambda (standard output is the result there).
    fn emit_metrics(&self, mut metrics: Metrics) {
        if let Some(reason) = &self.webhook_unavailable {
            warn!(%reason, "webhook unavailable: no notices are sent from this container");
            metrics.webhook_unavailable = 1;
        }
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
        run: &Run<'_>,
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
        let prepared = self.act(interruption, &action, run, &mut result).await?;
        Ok((result, prepared))
    }

    /// The drain, if one is due, then the lifecycle action and the record of the outcome.
    async fn finish(
        &self,
        interruption: &Interruption,
        prepared: Result<(InterruptionResult, Prepared), StepError>,
        run: &Run<'_>,
    ) -> Result<InterruptionResult, StepError> {
        let (mut result, prepared) = prepared?;
        let step = match prepared {
            Prepared::Finished(step) => step,
            Prepared::Drain {
                cluster,
                node,
                cordon_notice,
            } => {
                self.drain_node(
                    interruption,
                    &cluster,
                    &node,
                    cordon_notice,
                    run,
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
                Step::Refused(_) => "not completed: the event was refused".to_owned(),
                Step::Continues(_) => {
                    "pending: the drain continues in another invocation, which completes it"
                        .to_owned()
                }
                Step::NeverJoined(why) => {
                    format!("not completed: {why}; the hook's default result applies")
                }
                // A blip is no reason to let the instance go undrained: the invocation fails,
                // Lambda retries it, and the retry drains and completes. Only a failure no
                // retry can mend (a refused permission) releases the hook now.
                Step::DrainFailed {
                    transient: true, ..
                } => "not completed: the drain failed on a transient error; the invocation \
                      fails and its retry completes it"
                    .to_owned(),
                Step::Done(_) | Step::DrainFailed { .. } => {
                    if result.drain.is_some() {
                        self.delay_completion(interruption, lifecycle, run).await;
                    }
                    let completion = budget::within(
                        "CompleteLifecycleAction",
                        budget::AWS_CALL,
                        self.lifecycle
                            .complete(&interruption.instance_id, lifecycle, CONTINUE),
                    )
                    .await??;
                    json!(completion).as_str().unwrap_or_default().to_owned()
                }
            });
        }
        let what = match step {
            Step::Done(what)
            | Step::NotOurs(what)
            | Step::NeverJoined(what)
            | Step::Continues(what) => what,
            Step::Refused(why) => format!("refused: {why}"),
            Step::DrainFailed { message, .. } => return Err(StepError::new("drain", &message)),
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
        run: &Run<'_>,
        result: &mut InterruptionResult,
    ) -> Result<Prepared, StepError> {
        // An ignored lifecycle action is still completed at once, but only for an instance
        // this deployment serves: another team's hook is never released by us.
        let ignored = *action == Action::Ignore;
        if ignored && interruption.lifecycle.is_none() {
            return Ok(Prepared::from(Step::Done("ignored by policy".into())));
        }
        // A state the event claims is checked against the state now, not a cached one.
        let described = if claims_state(interruption) {
            self.resolver
                .describe_now(&interruption.instance_id)
                .await?
        } else {
            self.resolver.describe(&interruption.instance_id).await?
        };
        let Some(instance) = described else {
            return Ok(Prepared::from(Step::Done("instance unknown to EC2".into())));
        };
        let cluster = match self.clusters.for_instance(&instance).await? {
            Choice::Serve(cluster) => cluster,
            Choice::NotOurs(why) => return Ok(Prepared::from(Step::NotOurs(why))),
        };
        tracing::Span::current().record("cluster", cluster.name.as_str());
        if let Some(tag) = &self.managed_tag {
            if !self.resolver.is_managed(&instance, tag).await? {
                return Ok(Prepared::from(Step::NotOurs(format!(
                    "instance and its group lack the managed tag {tag}"
                ))));
            }
        }
        if ignored {
            return Ok(Prepared::from(Step::Done(
                "ignored by policy; lifecycle action completed at once".into(),
            )));
        }
        if let Some(why) = self.contradiction(interruption, &instance).await? {
            warn!(reason = %why, "event refused: it contradicts what EC2 says");
            return Ok(Prepared::from(Step::Refused(why)));
        }
        if let (InterruptionKind::AsgTermination, Some(lifecycle)) =
            (interruption.kind, &interruption.lifecycle)
        {
            let asked = self
                .lifecycle
                .termination_contradiction(&interruption.instance_id, lifecycle)
                .await;
            if let Some(why) = asked {
                warn!(reason = %why, "event refused: it contradicts what Auto Scaling says");
                return Ok(Prepared::from(Step::Refused(why)));
            }
        }
        let likely_name = instance.private_dns_name.as_deref();
        if *action == Action::WaitReady {
            return self
                .wait_ready(
                    &cluster,
                    interruption,
                    likely_name,
                    run.invocation.end,
                    result,
                )
                .await
                .map(Prepared::from);
        }
        let Some(node) = cluster
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
        if self.leave_karpenter_nodes {
            if let Some(label) = karpenter_label(&node) {
                return Ok(Prepared::from(Step::NotOurs(format!(
                    "node {node_name} is Karpenter's (label {label}); LEAVE_KARPENTER_NODES \
                     leaves it to Karpenter's interruption handling"
                ))));
            }
        }
        if let Some(continued) = run.continuation {
            let recorded = cluster.marker.continuation_token(&node);
            let ours = cluster.marker.continuing_for(&node, interruption)
                && !continued.token.is_empty()
                && recorded == Some(continued.token.as_str());
            if !ours {
                let why = format!(
                    "continuation round {} is not the one node {node_name} records: not sent by \
                     this function, or its drain has ended",
                    continued.round
                );
                warn!(reason = %why, "continuation refused");
                return Ok(Prepared::from(Step::Refused(why)));
            }
        }

        let Action::Disrupt {
            taint,
            cordon,
            drain,
        } = action
        else {
            // The policy plans a restore only for a kind that ends another.
            let Some(ended) = interruption.kind.restores() else {
                return Ok(Prepared::from(Step::Done("nothing to restore".into())));
            };
            let restored = cluster.marker.restore(&node, ended, true).await?;
            if let RestoreOutcome::Restored { uncordoned } = restored {
                let message = format!(
                    "Instance {}: {} (event {}) ends {ended}: {}",
                    interruption.instance_id,
                    interruption.kind,
                    interruption.id,
                    if uncordoned {
                        "uncordoned and untainted"
                    } else {
                        "untainted; the cordon set by someone else stays"
                    }
                );
                cluster
                    .events
                    .emit(&node, EventType::Normal, "Uncordoned", &message)
                    .await;
            }
            return Ok(Prepared::from(Step::Done(match restored {
                RestoreOutcome::Restored { uncordoned: true } => "uncordoned".into(),
                RestoreOutcome::Restored { uncordoned: false } => {
                    "untainted; the cordon was not nth's".into()
                }
                RestoreOutcome::NotOurs => format!("not marked by nth for {ended}; left alone"),
                RestoreOutcome::DryRun => "dry-run".into(),
            })));
        };
        let marked = cluster
            .marker
            .mark(&node, interruption, taint.as_deref(), *cordon, *drain)
            .await?;
        let mut cordon_notice = None;
        if marked == MarkOutcome::Marked {
            cordon_notice = self.notify(
                notice(interruption, &cluster.name, &node_name, &action.name()),
                None,
            );
            result.cordoned_after_ms =
                u64::try_from((Utc::now() - interruption.event_time).num_milliseconds()).ok();
            cluster
                .events
                .interruption(&node, interruption, &action.name())
                .await;
        }
        if !drain {
            run.keep(cordon_notice);
            return Ok(Prepared::from(Step::Done(
                match marked {
                    MarkOutcome::Marked => "marked",
                    MarkOutcome::AlreadyMarked => "already-marked",
                    MarkOutcome::DryRun => "dry-run",
                }
                .into(),
            )));
        }
        if cluster.marker.drained_for(&node, interruption) {
            info!(node = %node_name, "this interruption's drain already completed; not draining again");
            run.keep(cordon_notice);
            return Ok(Prepared::from(Step::Done("already-drained".into())));
        }
        if run.continuation.is_none() && cluster.marker.continuing_for(&node, interruption) {
            info!(node = %node_name, "this interruption's drain goes on in another invocation; not starting a second");
            run.keep(cordon_notice);
            return Ok(Prepared::from(Step::Continues(
                "drain-continuing-elsewhere".into(),
            )));
        }
        Ok(Prepared::Drain {
            cluster,
            node: Box::new(node),
            cordon_notice,
        })
    }

    /// Drains a marked node, reports the outcome and records a complete drain on the node.
    async fn drain_node(
        &self,
        interruption: &Interruption,
        cluster: &Cluster,
        node: &Node,
        cordon_notice: Option<tokio::task::JoinHandle<()>>,
        run: &Run<'_>,
        result: &mut InterruptionResult,
    ) -> Result<Step, StepError> {
        let node_name = node.metadata.name.clone().unwrap_or_default();
        let mut drain_limit = continuation::drain_limit(run.drain_started, self.max_drain);
        let hook = match &interruption.lifecycle {
            Some(lifecycle) => {
                self.lifecycle
                    .limits(&interruption.instance_id, lifecycle)
                    .await
            }
            None => None,
        };
        if let Some(hook) = hook {
            // Auto Scaling lets the instance go at the hook's global timeout, counted from the
            // action's start, heartbeats or not, with the hook's default result: the drain
            // ends early enough for its completion to reach Auto Scaling first.
            let hook_end = TimeDelta::from_std(hook.global_timeout)
                .ok()
                .and_then(|t| interruption.event_time.checked_add_signed(t - WRAP_UP));
            if let Some(hook_end) = hook_end {
                drain_limit = drain_limit.min(hook_end);
            }
        }
        // A termination hook's drain leaves room for the completion delay after it.
        let reserved = match interruption.kind {
            InterruptionKind::AsgTermination => {
                TimeDelta::from_std(self.completion_delay).unwrap_or_default()
            }
            _ => TimeDelta::zero(),
        };
        let window = drain_window(
            interruption.deadline,
            drain_limit,
            run.invocation.end - reserved,
        );
        let deadline = window.deadline;
        let drained = match &interruption.lifecycle {
            Some(lifecycle) => {
                let configured = self.lifecycle.heartbeat_interval;
                self.lifecycle
                    .with_heartbeats(
                        &interruption.instance_id,
                        lifecycle,
                        hook.map_or(configured, |h| h.heartbeat_interval(configured)),
                        run.continuation.is_some(),
                        cluster.drainer.drain(&node_name, deadline),
                    )
                    .await
            }
            None => cluster.drainer.drain(&node_name, deadline).await,
        };
        let report = match drained {
            Ok(report) => report,
            Err(error) => {
                warn!(%error, transient = error.is_transient(), "drain failed");
                return Ok(Step::DrainFailed {
                    transient: error.is_transient(),
                    message: error.to_string(),
                });
            }
        };
        if !report.complete && !self.policy.dry_run && window.may_continue {
            if let Some(function) = &run.invocation.function_arn {
                let token = continuation::new_token().map_err(|e| {
                    StepError::new(
                        "drain",
                        &format!("no random source for the continuation token: {e}"),
                    )
                })?;
                let next = Continuation {
                    event: run.event.clone(),
                    instance_id: interruption.instance_id.clone(),
                    started: run.drain_started,
                    round: run.continuation.map_or(1, |c| c.round) + 1,
                    token,
                };
                // Recorded before the next round is invoked, which checks it.
                budget::within(
                    "the node's record of the continued drain",
                    budget::RECORD,
                    cluster
                        .marker
                        .record_continuing(&node_name, interruption, &next.token),
                )
                .await??;
                let invoked = budget::within(
                    "the Invoke continuing the drain",
                    budget::AWS_CALL,
                    continuation::invoke(&self.aws, function, &next),
                )
                .await
                .map_err(StepError::from)
                .and_then(|sent| sent.map_err(|e| StepError::new("drain", &e)));
                if let Err(error) = invoked {
                    // No round holds the token now (or, if the Invoke did go through, the
                    // round it started refuses itself): Lambda's retry of this invocation
                    // starts the chain again.
                    let _logged = budget::within(
                        "forgetting the continued drain",
                        budget::RECORD,
                        cluster.marker.end_continuing(&node_name),
                    )
                    .await;
                    return Err(error);
                }
                run.keep(cordon_notice);
                result.drain = Some(report);
                return Ok(Step::Continues("drain-continues".into()));
            }
        }
        let outcome = budget::within(
            "the node's record of the drain's end",
            budget::RECORD,
            self.record_drain_end(interruption, cluster, node, run, &report),
        )
        .await??;
        run.keep(self.notify(
            Notice {
                outcome: Some(outcome.to_owned()),
                evicted: Some(report.evicted.len()),
                left: Some(report.left.len()),
                ..notice(
                    interruption,
                    &cluster.name,
                    &node_name,
                    &format!("drain {outcome}"),
                )
            },
            cordon_notice,
        ));
        result.drain = Some(report);
        Ok(Step::Done(outcome.into()))
    }

    /// Records on the node how its drain ended, once, when it has ended (not for each round
    /// of a drain that goes on): the Kubernetes Event, and the annotation that a later
    /// delivery of the event reads. Returns the outcome's name.
    async fn record_drain_end(
        &self,
        interruption: &Interruption,
        cluster: &Cluster,
        node: &Node,
        run: &Run<'_>,
        report: &DrainReport,
    ) -> Result<&'static str, StepError> {
        if self.policy.dry_run {
            return Ok("dry-run");
        }
        let node_name = node.metadata.name.as_deref().unwrap_or_default();
        cluster
            .events
            .drain_outcome(node, interruption, report)
            .await;
        Ok(if report.complete {
            cluster
                .marker
                .record_drained(node_name, interruption)
                .await?;
            "drained"
        } else {
            if run.continuation.is_some() {
                // The chain ends here: a later delivery must not take it for a live one.
                cluster.marker.end_continuing(node_name).await?;
            }
            if interruption.lifecycle.is_some() {
                warn!(
                    left = report.left.len(),
                    "drain incomplete at its deadline; completing the lifecycle action anyway"
                );
            }
            "drain-incomplete"
        })
    }

    /// Waits LIFECYCLE_COMPLETION_DELAY_SECONDS after a termination hook's drain, keeping
    /// the hook alive, so that load balancers finish deregistering the instance before Auto
    /// Scaling lets it go; never past what the invocation's end leaves.
    async fn delay_completion(
        &self,
        interruption: &Interruption,
        lifecycle: &nth_core::LifecycleAction,
        run: &Run<'_>,
    ) {
        if self.completion_delay.is_zero()
            || interruption.kind != InterruptionKind::AsgTermination
            || self.policy.dry_run
        {
            return;
        }
        let left = (run.invocation.end - WRAP_UP - Utc::now())
            .to_std()
            .unwrap_or_default();
        let delay = self.completion_delay.min(left);
        if delay < self.completion_delay {
            warn!(
                configured_s = self.completion_delay.as_secs(),
                delay_ms = delay.as_millis() as u64,
                "the lifecycle completion delay is cut to what the invocation has left"
            );
        }
        info!(
            delay_ms = delay.as_millis() as u64,
            "waiting before completing the lifecycle action"
        );
        self.lifecycle
            .with_heartbeats(
                &interruption.instance_id,
                lifecycle,
                self.lifecycle.heartbeat_interval,
                false,
                tokio::time::sleep(delay),
            )
            .await;
    }

    /// Why the event cannot be true of the instance (see [`verify`]). EC2's API is eventually
    /// consistent: a state it does not show yet is asked for again after [`STATE_SETTLE`].
    async fn contradiction(
        &self,
        interruption: &Interruption,
        instance: &crate::resolve::InstanceInfo,
    ) -> Result<Option<String>, StepError> {
        let why = verify::contradiction(interruption, instance);
        if why.is_none() || !claims_state(interruption) {
            return Ok(why);
        }
        tokio::time::sleep(STATE_SETTLE).await;
        Ok(
            match self
                .resolver
                .describe_now(&interruption.instance_id)
                .await?
            {
                Some(fresh) => verify::contradiction(interruption, &fresh),
                None => why,
            },
        )
    }

    /// Sends a webhook notice in the background, so that a slow receiver never holds up
    /// the drain, once the notice `after` is sent: a receiver sees one interruption's
    /// notices in order. The handle goes to [`Run::keep`].
    fn notify(
        &self,
        notice: Notice,
        after: Option<tokio::task::JoinHandle<()>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let hook = self.webhook.clone()?;
        Some(tokio::spawn(
            async move {
                if let Some(previous) = after {
                    let _sent_or_logged = previous.await;
                }
                hook.send(&notice).await;
            }
            .instrument(tracing::Span::current()),
        ))
    }

    /// For a launching instance: waits until its node has joined and is Ready, bounded by the
    /// invocation's end, looking it up by name once per poll interval.
    async fn wait_ready(
        &self,
        cluster: &Cluster,
        interruption: &Interruption,
        likely_name: Option<&str>,
        invocation_end: DateTime<Utc>,
        result: &mut InterruptionResult,
    ) -> Result<Step, StepError> {
        let give_up = invocation_end - WRAP_UP;
        let mut polls: u32 = 0;
        loop {
            // A node named otherwise than its PrivateDnsName (hostname-override, Bottlerocket,
            // kops) is found by its providerID, as every other path finds it; that needs a
            // LIST, so it is made only every few polls, not every five seconds.
            let node = if polls.is_multiple_of(LAUNCH_LISTS_EVERY) {
                cluster
                    .marker
                    .find(&interruption.instance_id, likely_name)
                    .await
            } else {
                match likely_name {
                    Some(name) => cluster.marker.get(name).await,
                    None => Ok(None),
                }
            }?;
            polls += 1;
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

/// The labels Karpenter puts on the nodes it launches: `karpenter.sh/nodepool` (v1 and
/// v1beta1), `karpenter.sh/provisioner-name` (v1alpha5).
const KARPENTER_LABELS: [&str; 2] = ["karpenter.sh/nodepool", "karpenter.sh/provisioner-name"];

/// The Karpenter label the node carries, if any.
fn karpenter_label(node: &Node) -> Option<&'static str> {
    let labels = node.metadata.labels.as_ref()?;
    KARPENTER_LABELS
        .into_iter()
        .find(|label| labels.contains_key(*label))
}

/// Whether the event claims a state of the instance (a state-change notification).
fn claims_state(interruption: &Interruption) -> bool {
    matches!(
        interruption.kind,
        InterruptionKind::InstanceStopping | InterruptionKind::InstanceRunning
    )
}

/// A webhook notice about an interruption's node.
fn notice(interruption: &Interruption, cluster: &str, node: &str, description: &str) -> Notice {
    Notice {
        event_id: interruption.id.clone(),
        kind: interruption.kind.to_string(),
        instance_id: interruption.instance_id.clone(),
        node: node.to_owned(),
        cluster: cluster.to_owned(),
        start_time: interruption.event_time,
        description: description.to_owned(),
        outcome: None,
        evicted: None,
        left: None,
    }
}

/// Where an interruption stands after its node was marked.
enum Prepared {
    Finished(Step),
    /// The node is marked; its drain comes once every node of the event is marked.
    Drain {
        cluster: Arc<Cluster>,
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
    /// The payload is not to be believed (it contradicts EC2, or is a continuation this
    /// function did not send): no write anywhere, no lifecycle completion.
    Refused(String),
    /// A launching instance's node did not become Ready in time.
    NeverJoined(String),
    /// The drain goes on in another invocation, which answers any lifecycle action.
    Continues(String),
    /// The drain could not run; the invocation fails so that Lambda retries it. A lifecycle
    /// action is completed first only when the failure is not `transient`: a retry would
    /// meet it again.
    DrainFailed { transient: bool, message: String },
}

/// A continued drain is worth an invocation only if it has at least this long beyond the
/// current one: less is within what the instance's own end or the limit will cut anyway.
const MIN_CONTINUATION: TimeDelta = TimeDelta::seconds(30);

/// When this invocation's drain must end, and whether it may go on in another.
#[derive(Debug)]
struct DrainWindow {
    deadline: DrainDeadline,
    /// The drain's end lies well beyond this invocation's.
    may_continue: bool,
}

/// The drain ends at the instance's end or at `drain_limit` (MAX_DRAIN_SECONDS after it
/// began), whichever comes first; at that time a lifecycle action is completed and the
/// instance goes, so pods are made to stop before it. An instance end already in the past
/// (an old event retried from the dead-letter queue, a skewed clock) says nothing reliable
/// about the instance and is ignored, instead of killing every pod with no grace. A drain
/// limit already past is not: it is nth's own or the hook's (a continuation that arrived
/// late), so the drain gives up at once and the lifecycle action is completed.
fn drain_window(
    instance_end: Option<DateTime<Utc>>,
    drain_limit: DateTime<Utc>,
    invocation_end: DateTime<Utc>,
) -> DrainWindow {
    let now = Utc::now();
    if drain_limit <= now {
        warn!(%drain_limit, "the drain's limit (MAX_DRAIN_SECONDS) has passed; ending it now");
        return DrainWindow {
            deadline: DrainDeadline {
                pods_stopped_by: None,
                give_up_at: now,
            },
            may_continue: false,
        };
    }
    let end = instance_end
        .filter(|end| *end > now)
        .map_or(drain_limit, |end| end.min(drain_limit));
    let end = (end > now).then_some(end);
    if end.is_none() {
        debug!("no usable end for the drain; pods keep their own grace periods");
    }
    let invocation_limit = invocation_end - WRAP_UP;
    DrainWindow {
        deadline: DrainDeadline {
            pods_stopped_by: end.map(|end| end - POD_STOP_MARGIN),
            give_up_at: end.map_or(invocation_limit, |end| end.min(invocation_limit)),
        },
        may_continue: end.is_some_and(|end| end > invocation_limit + MIN_CONTINUATION),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_ends_at_the_earliest_of_instance_end_limit_and_invocation_end() {
        let now = Utc::now();
        let at = |secs: i64| now + TimeDelta::seconds(secs);
        let hour = at(3600);

        // A Spot instance's two minutes within a short invocation: stop with the invocation.
        let w = drain_window(Some(at(120)), hour, at(60));
        assert_eq!(w.deadline.give_up_at, at(60) - WRAP_UP);
        assert_eq!(w.deadline.pods_stopped_by, Some(at(120) - POD_STOP_MARGIN));
        assert!(
            w.may_continue,
            "the instance outlives the invocation by a minute"
        );

        // ... within a long one: stop with the instance, nothing left to continue for.
        let w = drain_window(Some(at(120)), hour, at(900));
        assert_eq!(w.deadline.give_up_at, at(120));
        assert!(!w.may_continue);

        // A lifecycle hook has no instance end: the limit stands in for it.
        let w = drain_window(None, hour, at(900));
        assert_eq!(w.deadline.pods_stopped_by, Some(hour - POD_STOP_MARGIN));
        assert_eq!(w.deadline.give_up_at, at(900) - WRAP_UP);
        assert!(w.may_continue);
        let w = drain_window(None, at(910), at(900));
        assert!(
            !w.may_continue,
            "ten seconds past the invocation are not worth another"
        );

        // A deadline already past is ignored rather than turned into zero grace.
        let stale = drain_window(Some(now - TimeDelta::hours(3)), hour, at(900));
        assert_eq!(stale.deadline.pods_stopped_by, Some(hour - POD_STOP_MARGIN));
        // The drain's own limit already past (a continuation delivered late) is enforced:
        // the drain ends now, not a whole invocation later.
        let late = drain_window(None, now - TimeDelta::hours(3), at(900));
        assert_eq!(late.deadline.pods_stopped_by, None);
        assert!(late.deadline.give_up_at <= Utc::now());
        assert!(!late.may_continue);
        let late = drain_window(Some(at(120)), now - TimeDelta::seconds(1), at(900));
        assert!(late.deadline.give_up_at <= Utc::now());
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

    #[test]
    fn explain_says_a_closed_reboot_maintenance_gives_nodes_back() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/events/eventbridge/aws-health-reboot-maintenance-closed.json"
        );
        let mut event: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("sample")).expect("JSON");
        let plan = explain(&event, &Policy::default()).expect("valid");
        for i in plan["interruptions"].as_array().expect("a list") {
            assert_eq!(i["kind"], "maintenance-closed");
            assert_eq!(i["action"], "uncordon");
            assert_eq!(i["restores"], "scheduled-maintenance");
        }
        event["detail"]["eventTypeCode"] = json!("AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED");
        let plan = explain(&event, &Policy::default()).expect("valid");
        assert!(plan["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("closed")));
    }
}
