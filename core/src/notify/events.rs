//! Kubernetes Events on the node, so that `kubectl describe node` tells what nth did and why.
//! An event that cannot be posted is logged and forgotten: it never holds up a drain.

use chrono::Utc;
use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, warn};

/// Events about cluster-scoped objects (nodes) live in `default`, as the kubelet's do.
const EVENT_NAMESPACE: &str = "default";

/// The component events are reported under.
pub const COMPONENT: &str = "nth";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

#[derive(Clone)]
pub struct NodeEvents {
    events: Api<Event>,
    dry_run: bool,
}

impl std::fmt::Debug for NodeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEvents")
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

impl NodeEvents {
    pub fn new(client: Client, dry_run: bool) -> Self {
        Self {
            events: Api::namespaced(client, EVENT_NAMESPACE),
            dry_run,
        }
    }

    /// Posts an event about `node` with a CamelCase `reason` and a sentence of `message`.
    pub async fn emit(&self, node: &Node, kind: EventType, reason: &str, message: &str) {
        let name = node.metadata.name.clone().unwrap_or_default();
        if self.dry_run {
            info!(node = %name, reason, message, "dry run: would post a Kubernetes event");
            return;
        }
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": { "generateName": format!("{name}."), "namespace": EVENT_NAMESPACE },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Node",
                "name": name,
                "uid": node.metadata.uid.clone().unwrap_or_default(),
            },
            "reason": reason,
            "message": message,
            "type": match kind { EventType::Normal => "Normal", EventType::Warning => "Warning" },
            "source": { "component": COMPONENT },
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let posted = match serde_json::from_value::<Event>(event) {
            Ok(event) => self
                .events
                .create(&PostParams::default(), &event)
                .await
                .map(drop),
            Err(error) => Err(kube::Error::SerdeError(error)),
        };
        if let Err(error) = posted {
            warn!(node = %name, reason, %error, "posting the Kubernetes event failed");
        }
    }
}

/// Pods named in a DrainIncomplete event's message; the drain report in the log has them all.
const NAMED_PODS: usize = 5;

impl NodeEvents {
    /// The interruption and what nth does about it, once the node is marked.
    pub async fn interruption(
        &self,
        node: &Node,
        interruption: &crate::Interruption,
        action: &str,
    ) {
        let reason = interruption.kind.event_reason();
        let deadline = interruption
            .deadline
            .map(|d| format!(", instance expected to go at {}", d.to_rfc3339()))
            .unwrap_or_default();
        let message = format!(
            "{reason} for instance {} (event {}{deadline}): {action}",
            interruption.instance_id, interruption.id,
        );
        self.emit(node, EventType::Normal, reason, &message).await;
    }

    /// How the drain ended: `Drained`, or a `DrainIncomplete` warning naming what stayed.
    pub async fn drain_outcome(
        &self,
        node: &Node,
        interruption: &crate::Interruption,
        report: &crate::DrainReport,
    ) {
        let reason = interruption.kind.event_reason();
        let seconds = report.duration_ms as f64 / 1000.0;
        if report.complete {
            let message = format!(
                "Drained for {reason} (event {}): {} pods evicted, {} finished pods deleted in {seconds:.1} s",
                interruption.id,
                report.evicted.len(),
                report.deleted.len(),
            );
            self.emit(node, EventType::Normal, "Drained", &message)
                .await;
        } else {
            let named: Vec<String> = report
                .left
                .iter()
                .take(NAMED_PODS)
                .map(|p| format!("{}: {}", p.pod, p.reason))
                .collect();
            let message = format!(
                "Drain for {reason} (event {}) ended at its deadline with {} pods left: {}",
                interruption.id,
                report.left.len(),
                named.join("; "),
            );
            self.emit(node, EventType::Warning, "DrainIncomplete", &message)
                .await;
        }
    }
}
