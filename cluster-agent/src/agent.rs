//! The poll loop: read the notices from IMDS, act once on each new one against this node,
//! and take back a maintenance cordon once the maintenance is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use k8s_openapi::api::core::v1::Node;
use nth_core::drain::DrainDeadline;
use nth_core::node::provider_id_matches;
use nth_core::{
    Action, Drainer, EventType, Interruption, InterruptionKind, MarkOutcome, NodeEvents,
    NodeMarker, Policy, RestoreOutcome,
};
use tokio::task::AbortHandle;
use tracing::{error, info, info_span, warn, Instrument};

use crate::imds::Imds;
use crate::metrics::{ErrorSource, Metrics};
use crate::notices::{self, EventState, ScheduledEvent};
use crate::reboot::{self, RebootRecord, RebootRecords};

/// Pods are made to stop this long before the instance is expected to go, as the Lambda
/// does: time for the runtime to kill stragglers and the kubelet to report them gone.
const POD_STOP_MARGIN: TimeDelta = TimeDelta::seconds(15);

/// After consecutive failed polls the interval doubles, up to this many times the
/// configured one: IMDS gets room to recover, and a notice arriving meanwhile still waits at
/// most a few intervals once it answers again.
const MAX_BACKOFF_FACTOR: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Node(#[from] nth_core::NodeError),
    #[error(transparent)]
    Drain(#[from] nth_core::DrainError),
    #[error(transparent)]
    Record(#[from] reboot::RecordError),
    #[error("node {0} does not exist")]
    NoNode(String),
    #[error(
        "node {node} has providerID {provider_id:?}, which is not this instance ({instance_id})"
    )]
    NotThisInstance {
        node: String,
        provider_id: String,
        instance_id: String,
    },
}

/// The instance the agent runs on, as IMDS names it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub instance_id: String,
    pub zone: String,
}

#[derive(Debug)]
pub struct Agent {
    pub node_name: String,
    pub identity: Identity,
    pub imds: Imds,
    pub policy: Policy,
    pub marker: NodeMarker,
    pub drainer: Drainer,
    pub events: NodeEvents,
    pub records: RebootRecords,
    pub metrics: Arc<Metrics>,
    pub poll_interval: Duration,
    pub reboot_check_interval: Duration,
    pub max_drain: Duration,
    /// Notices acted on (or being acted on) by id, so each is handled once however many
    /// polls see it; the handle stops a maintenance drain whose event is cancelled.
    pub handled: Mutex<HashMap<String, AbortHandle>>,
    /// The maintenance record on the node, while a restore is owed.
    pub pending: Mutex<Option<RebootRecord>>,
}

/// Reads the instance's identity, retrying with backoff until IMDS answers.
pub async fn identity(imds: &Imds, interval: Duration, metrics: &Metrics) -> Identity {
    let mut failures = 0;
    loop {
        let read = async {
            let id = imds.get(notices::INSTANCE_ID_PATH).await?;
            let zone = imds.get(notices::ZONE_PATH).await?;
            Ok::<_, crate::imds::ImdsError>((id, zone))
        };
        match read.await {
            Ok((Some(instance_id), Some(zone))) => {
                return Identity {
                    instance_id: instance_id.trim().to_owned(),
                    zone: zone.trim().to_owned(),
                }
            }
            Ok(_) => warn!("IMDS has no instance-id or availability zone yet; retrying"),
            Err(error) => {
                metrics.error(ErrorSource::Imds);
                warn!(%error, "reading the instance identity from IMDS failed; retrying");
            }
        }
        failures += 1;
        tokio::time::sleep(backoff(interval, failures)).await;
    }
}

fn backoff(interval: Duration, failures: u32) -> Duration {
    interval * 2u32.pow(failures.min(MAX_BACKOFF_FACTOR.ilog2()))
}

impl Agent {
    /// Confirms the node is this instance's, then takes up any maintenance restore owed from
    /// before a restart (the reboot itself restarts the agent). Kubernetes errors are retried.
    pub async fn start(&self) -> Result<(), AgentError> {
        let mut failures = 0;
        let node = loop {
            match self.own_node().await {
                Ok(node) => break node,
                Err(AgentError::Node(error)) => {
                    self.metrics.error(ErrorSource::Kubernetes);
                    warn!(%error, "reading this node failed; retrying");
                    failures += 1;
                    tokio::time::sleep(backoff(self.poll_interval, failures)).await;
                }
                Err(other) => return Err(other),
            }
        };
        let record = self.records.read(&node);
        *self.lock_pending() = record.clone();
        if let Some(record) = record {
            info!(event_id = %record.event_id, "a maintenance restore is owed from before");
            if record.rebooted(&node) {
                self.restore(&node, &record, "the node rebooted").await?;
            }
        }
        Ok(())
    }

    /// The node, checked to be this instance's by its providerID (`aws:///<az>/<id>`).
    async fn own_node(&self) -> Result<Node, AgentError> {
        let node = self
            .marker
            .get(&self.node_name)
            .await?
            .ok_or_else(|| AgentError::NoNode(self.node_name.clone()))?;
        let provider_id = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .unwrap_or_default();
        // A node without a providerID yet (the cloud controller sets it after the kubelet
        // registers) is taken on NODE_NAME's word; one naming another instance never is.
        let ours = provider_id.is_empty()
            || (provider_id_matches(&provider_id, &self.identity.instance_id)
                && provider_id.contains(&format!("/{}/", self.identity.zone)));
        if !ours {
            return Err(AgentError::NotThisInstance {
                node: self.node_name.clone(),
                provider_id,
                instance_id: self.identity.instance_id.clone(),
            });
        }
        Ok(node)
    }

    /// Polls forever. Nothing IMDS or the API server does ends the loop.
    pub async fn run(self: Arc<Self>) {
        let mut failures = 0;
        let mut last_reboot_check = Instant::now();
        loop {
            if self.poll().await {
                failures = 0;
            } else {
                failures += 1;
            }
            let owed = self.lock_pending().is_some();
            if owed && last_reboot_check.elapsed() >= self.reboot_check_interval {
                last_reboot_check = Instant::now();
                self.check_reboot().await;
            }
            tokio::time::sleep(backoff(self.poll_interval, failures)).await;
        }
    }

    /// One look at every notice path; `true` when IMDS answered them all.
    async fn poll(self: &Arc<Self>) -> bool {
        let now = Utc::now();
        let instance = self.identity.instance_id.as_str();
        let mut ok = true;
        let mut found: Vec<Interruption> = Vec::new();
        let mut scheduled: Vec<ScheduledEvent> = Vec::new();
        for path in [
            notices::SPOT_PATH,
            notices::REBALANCE_PATH,
            notices::SCHEDULED_PATH,
            notices::TARGET_LIFECYCLE_PATH,
        ] {
            let body = match self.imds.get(path).await {
                Ok(Some(body)) => body,
                Ok(None) => continue,
                Err(error) => {
                    ok = false;
                    self.metrics.error(ErrorSource::Imds);
                    warn!(%error, "IMDS poll failed");
                    continue;
                }
            };
            let parsed = match path {
                notices::SPOT_PATH => notices::spot(&body, instance, now).map(|i| found.push(i)),
                notices::REBALANCE_PATH => {
                    notices::rebalance(&body, instance).map(|i| found.push(i))
                }
                notices::SCHEDULED_PATH => notices::scheduled(&body).map(|s| scheduled = s),
                _ => {
                    found.extend(notices::asg_target_state(&body, instance, now));
                    Ok(())
                }
            };
            if let Err(error) = parsed {
                ok = false;
                self.metrics.error(ErrorSource::Imds);
                warn!(%error, "IMDS notice not understood");
            }
        }
        if ok {
            self.metrics.polled(now);
        }
        for event in &scheduled {
            match event.state {
                EventState::Active => found.push(event.interruption(instance, now)),
                EventState::Canceled | EventState::Completed => self.maintenance_over(event).await,
            }
        }
        for interruption in found {
            self.spawn_once(interruption);
        }
        ok
    }

    /// Starts acting on a notice unless it was already seen.
    fn spawn_once(self: &Arc<Self>, interruption: Interruption) {
        let mut handled = self.lock_handled();
        if handled.contains_key(&interruption.id) {
            return;
        }
        let span = info_span!(
            "notice",
            node = %self.node_name,
            notice = %interruption.id,
            kind = %interruption.kind,
            instance_id = %interruption.instance_id,
        );
        let agent = Arc::clone(self);
        let id = interruption.id.clone();
        let task = tokio::spawn(
            async move {
                let kind = interruption.kind.as_str();
                info!(deadline = ?interruption.deadline, detail = %interruption.detail, "new notice");
                match agent.act(&interruption).await {
                    Ok(outcome) => {
                        agent.metrics.action(kind, outcome);
                        info!(outcome, "notice handled");
                    }
                    Err(err) => {
                        agent.metrics.action(kind, "failed");
                        agent.metrics.error(ErrorSource::Kubernetes);
                        // Forgotten, so the next poll that sees the notice tries again.
                        agent.lock_handled().remove(&interruption.id);
                        error!(error = %err, "acting on the notice failed; will retry");
                    }
                }
            }
            .instrument(span),
        );
        handled.insert(id, task.abort_handle());
    }

    /// Marks the node and drains it as the policy says; the outcome names what was done.
    async fn act(&self, interruption: &Interruption) -> Result<&'static str, AgentError> {
        let action = self.policy.plan(interruption);
        let Action::Disrupt {
            taint,
            cordon,
            drain,
        } = &action
        else {
            return Ok("ignored");
        };
        let mut node = self.own_node().await?;
        if interruption.kind == InterruptionKind::ScheduledMaintenance {
            if let Some(recorded) = self.remember_maintenance(&node, interruption).await? {
                node = recorded;
            }
        }
        let marked = self
            .marker
            .mark(&node, interruption, taint.as_deref(), *cordon, *drain)
            .await?;
        if marked == MarkOutcome::Marked {
            self.events
                .interruption(&node, interruption, &action.name())
                .await;
        }
        if !drain {
            return Ok(match marked {
                MarkOutcome::Marked => "marked",
                MarkOutcome::AlreadyMarked => "already-marked",
                MarkOutcome::DryRun => "dry-run",
            });
        }
        if self.marker.drained_for(&node, interruption) {
            info!("this notice's drain already completed; not draining again");
            return Ok("already-drained");
        }
        let report = self
            .drainer
            .drain(&self.node_name, self.deadline(interruption))
            .await?;
        if self.policy.dry_run {
            return Ok("dry-run");
        }
        self.events
            .drain_outcome(&node, interruption, &report)
            .await;
        if !report.complete {
            return Ok("drain-incomplete");
        }
        self.marker
            .record_drained(&self.node_name, interruption)
            .await?;
        Ok("drained")
    }

    /// The instance's end less a margin for pods; retries stop at the instance's end, or after
    /// the longest drain allowed when that is later or unknown.
    fn deadline(&self, interruption: &Interruption) -> DrainDeadline {
        let limit = Utc::now() + TimeDelta::from_std(self.max_drain).unwrap_or(TimeDelta::MAX);
        DrainDeadline {
            pods_stopped_by: interruption.deadline.map(|end| end - POD_STOP_MARGIN),
            give_up_at: interruption.deadline.map_or(limit, |end| end.min(limit)),
        }
    }

    /// Writes the maintenance record before the node is marked, so that a crash between the
    /// two leaves a record of a restore owed, never a cordon nobody will take back.
    /// Returns the node as written, when it was.
    async fn remember_maintenance(
        &self,
        node: &Node,
        interruption: &Interruption,
    ) -> Result<Option<Node>, AgentError> {
        if let Some(existing) = self.records.read(node) {
            if existing.event_id == interruption.id {
                *self.lock_pending() = Some(existing);
                return Ok(None);
            }
        }
        let record = RebootRecord {
            event_id: interruption.id.clone(),
            boot_id: reboot::boot_id(node).unwrap_or_default().to_owned(),
        };
        let written = self.records.write(&self.node_name, &record).await?;
        info!(boot_id = %record.boot_id, "maintenance recorded on the node");
        *self.lock_pending() = Some(record);
        Ok(written)
    }

    /// A maintenance event was cancelled or completed: if it is the one the node was drained
    /// for, stop its drain and restore the node.
    async fn maintenance_over(&self, event: &ScheduledEvent) {
        let owed = self
            .lock_pending()
            .clone()
            .filter(|r| r.event_id == event.id);
        let Some(record) = owed else {
            return;
        };
        let span = info_span!("notice", node = %self.node_name, notice = %event.id, kind = "scheduled-maintenance", state = ?event.state);
        async {
            if let Some(task) = self.lock_handled().get(&event.id) {
                task.abort();
            }
            let reason = match event.state {
                EventState::Canceled => "the maintenance was cancelled",
                _ => "the maintenance completed",
            };
            match self.own_node().await {
                Ok(node) => {
                    if let Err(error) = self.restore(&node, &record, reason).await {
                        self.metrics.error(ErrorSource::Kubernetes);
                        error!(%error, "restoring the node failed; will retry");
                    }
                }
                Err(error) => {
                    self.metrics.error(ErrorSource::Kubernetes);
                    error!(%error, "reading the node to restore it failed; will retry");
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// While a restore is owed: has the node rebooted?
    async fn check_reboot(&self) {
        let Some(record) = self.lock_pending().clone() else {
            return;
        };
        let span = info_span!("notice", node = %self.node_name, notice = %record.event_id, kind = "scheduled-maintenance");
        async {
            let result = match self.own_node().await {
                Ok(node) if record.rebooted(&node) => {
                    self.restore(&node, &record, "the node rebooted").await
                }
                Ok(_) => Ok(()),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                self.metrics.error(ErrorSource::Kubernetes);
                error!(%error, "checking the node for a reboot failed; will retry");
            }
        }
        .instrument(span)
        .await;
    }

    /// Uncordons (unless the cordon was someone else's) and untaints a node drained for
    /// maintenance, then drops the record. A node since marked for anything else is left.
    async fn restore(
        &self,
        node: &Node,
        record: &RebootRecord,
        reason: &str,
    ) -> Result<(), AgentError> {
        let kind = InterruptionKind::ScheduledMaintenance;
        let marked_for_this = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&self.policy.event_annotation()))
            .is_some_and(|id| *id == record.event_id);
        let outcome = if marked_for_this {
            self.marker.restore(node, kind, true).await?
        } else {
            RestoreOutcome::NotOurs
        };
        if let RestoreOutcome::Restored { uncordoned } = outcome {
            let message = format!(
                "Maintenance event {} is over ({reason}): nth's taint removed{}",
                record.event_id,
                if uncordoned {
                    " and node uncordoned"
                } else {
                    "; the cordon set by someone else stays"
                }
            );
            self.events
                .emit(node, EventType::Normal, "Uncordoned", &message)
                .await;
        }
        self.records.clear(&self.node_name).await?;
        *self.lock_pending() = None;
        let outcome = match outcome {
            RestoreOutcome::Restored { uncordoned: true } => "uncordoned",
            RestoreOutcome::Restored { uncordoned: false } => "restored-cordon-kept",
            RestoreOutcome::NotOurs => "not-ours",
            RestoreOutcome::DryRun => "dry-run",
        };
        self.metrics.action(kind.as_str(), outcome);
        info!(reason, outcome, "maintenance restore done");
        Ok(())
    }

    fn lock_handled(&self) -> std::sync::MutexGuard<'_, HashMap<String, AbortHandle>> {
        self.handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Option<RebootRecord>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let i = Duration::from_secs(2);
        assert_eq!(backoff(i, 0), i);
        assert_eq!(backoff(i, 1), i * 2);
        assert_eq!(backoff(i, 2), i * 4);
        assert_eq!(backoff(i, 30), i * MAX_BACKOFF_FACTOR);
    }
}
