//! Finding a node and marking it: cordon, taint and annotation in one PATCH.

use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, instrument};

use crate::events::{Interruption, InterruptionKind};
use crate::policy::Policy;
use crate::retry;

/// Page size when a node must be found by listing: large enough that a 5,000-node cluster is
/// a handful of requests, small enough that one page stays well inside a 128 MB Lambda.
const NODE_LIST_PAGE: u32 = 500;

/// The field manager nth's writes are recorded under, as `kubectl` records `kubectl-cordon`.
pub const FIELD_MANAGER: &str = "nth";

/// The well-known label that takes a node out of external load balancers' target groups.
pub const EXCLUDE_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The well-known taint for a node that is shut down: pods are force-deleted and their
/// volumes detached without waiting for the (gone) kubelet.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("reading node {node}: {source}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing nodes to find instance {instance_id}: {source}")]
    List {
        instance_id: String,
        #[source]
        source: kube::Error,
    },
    #[error("patching node {node} (cordon/taint/annotate): {source}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// What marking a node did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MarkOutcome {
    Marked,
    /// The node already carries this interruption's marks: a duplicate delivery.
    AlreadyMarked,
    DryRun,
}

/// What restoring a node after its instance came back did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreOutcome {
    Restored,
    /// nth did not cordon this node for a stop: someone else's cordon is left alone.
    NotOurs,
    DryRun,
}

/// Is the node's Ready condition True?
pub fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Does `provider_id` (`aws:///<az>/<instance-id>`) name this instance?
pub fn provider_id_matches(provider_id: &str, instance_id: &str) -> bool {
    provider_id
        .rsplit('/')
        .next()
        .is_some_and(|last| last == instance_id)
}

#[derive(Debug, Clone)]
pub struct NodeMarker {
    nodes: Api<Node>,
    policy: Policy,
}

impl NodeMarker {
    pub fn new(client: Client, policy: Policy) -> Self {
        Self {
            nodes: Api::all(client),
            policy,
        }
    }

    /// Finds the node of an instance by `spec.providerID`. The likely name (EC2's
    /// PrivateDnsName, which EKS uses as the node name unless configured otherwise) is tried
    /// first with one GET; only if it is absent or names another instance are the nodes listed.
    #[instrument(skip(self), fields(instance_id))]
    pub async fn find(
        &self,
        instance_id: &str,
        likely_name: Option<&str>,
    ) -> Result<Option<Node>, NodeError> {
        if let Some(name) = likely_name.filter(|n| !n.is_empty()) {
            let node = self.get(name).await?;
            if let Some(node) = node {
                if node_provider_id(&node).is_none_or(|p| provider_id_matches(p, instance_id)) {
                    return Ok(Some(node));
                }
            }
        }
        self.find_by_listing(instance_id).await
    }

    async fn find_by_listing(&self, instance_id: &str) -> Result<Option<Node>, NodeError> {
        let mut params = ListParams::default().limit(NODE_LIST_PAGE);
        loop {
            let page = retry::idempotent("list nodes", || self.nodes.list(&params))
                .await
                .map_err(|source| NodeError::List {
                    instance_id: instance_id.to_owned(),
                    source,
                })?;
            let continue_token = page.metadata.continue_.clone();
            if let Some(node) = page
                .items
                .into_iter()
                .find(|n| node_provider_id(n).is_some_and(|p| provider_id_matches(p, instance_id)))
            {
                return Ok(Some(node));
            }
            match continue_token.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(None),
            }
        }
    }

    /// Cordons, taints and annotates the node in one strategic-merge PATCH. Taints merge by
    /// key on the server, so taints others set are kept without a read-modify-write race.
    #[instrument(skip_all, fields(event_id = %interruption.id, instance_id = %interruption.instance_id, node = node.metadata.name.as_deref().unwrap_or_default()))]
    pub async fn mark(
        &self,
        node: &Node,
        interruption: &Interruption,
        taint: Option<&str>,
        cordon: bool,
        draining: bool,
    ) -> Result<MarkOutcome, NodeError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if self.already_marked(node, interruption, taint, cordon) {
            info!(node = %name, "node already carries this interruption's marks; nothing to patch");
            return Ok(MarkOutcome::AlreadyMarked);
        }
        let patch = self.mark_patch(interruption, taint, cordon, draining);
        if !self.patch(&name, patch).await? {
            return Ok(MarkOutcome::DryRun);
        }
        info!(node = %name, cordon, taint = taint.unwrap_or("none"), "node marked");
        Ok(MarkOutcome::Marked)
    }

    /// Applies a strategic-merge patch, or logs it in a dry run. `Ok(true)` when applied.
    async fn patch(&self, name: &str, patch: serde_json::Value) -> Result<bool, NodeError> {
        if self.policy.dry_run {
            info!(node = %name, patch = %patch, "dry run: would patch node");
            return Ok(false);
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        // A strategic-merge patch sets absolute values: applying it twice is applying it once.
        let patch = Patch::Strategic(&patch);
        retry::idempotent("patch node", || self.nodes.patch(name, &params, &patch))
            .await
            .map_err(|source| NodeError::Patch {
                node: name.to_owned(),
                source,
            })?;
        Ok(true)
    }

    /// Reads a node by name; `None` when it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<Node>, NodeError> {
        retry::idempotent("get node", || self.nodes.get_opt(name))
            .await
            .map_err(|source| NodeError::Get {
                node: name.to_owned(),
                source,
            })
    }

    /// Has this interruption's drain already completed on the node (a duplicate delivery)?
    pub fn drained_for(&self, node: &Node, interruption: &Interruption) -> bool {
        annotation(node, &self.policy.drained_annotation()) == Some(interruption.id.as_str())
    }

    /// Is this interruption's drain being carried on by another invocation?
    pub fn continuing_for(&self, node: &Node, interruption: &Interruption) -> bool {
        annotation(node, &self.policy.continuing_annotation()) == Some(interruption.id.as_str())
    }

    /// Records on the node that this interruption's drain goes on in another invocation.
    pub async fn record_continuing(
        &self,
        node: &str,
        interruption: &Interruption,
    ) -> Result<(), NodeError> {
        let patch = json!({"metadata": {"annotations": {self.policy.continuing_annotation(): interruption.id}}});
        self.patch(node, patch).await.map(drop)
    }

    /// Forgets that a drain goes on elsewhere: the chain of invocations ended.
    pub async fn end_continuing(&self, node: &str) -> Result<(), NodeError> {
        let patch =
            json!({"metadata": {"annotations": {self.policy.continuing_annotation(): null}}});
        self.patch(node, patch).await.map(drop)
    }

    /// Records on the node that this interruption's drain completed.
    pub async fn record_drained(
        &self,
        node: &str,
        interruption: &Interruption,
    ) -> Result<(), NodeError> {
        // A drain continued across invocations ends here too.
        let mut patch = json!({"metadata": {"annotations": {
            self.policy.drained_annotation(): interruption.id,
            self.policy.continuing_annotation(): null,
        }}});
        // A rebalance recommendation's instance keeps running: it is not out of service.
        if self.policy.out_of_service_taint
            && interruption.kind != InterruptionKind::RebalanceRecommendation
        {
            patch["spec"] = json!({"taints": [{"key": OUT_OF_SERVICE_TAINT, "value": "nodeshutdown", "effect": "NoExecute"}]});
        }
        self.patch(node, patch).await.map(drop)
    }

    /// Uncordons and untaints a node that nth cordoned because its instance stopped. A node
    /// cordoned by anyone else, or by nth for another reason, is left as it is.
    pub async fn restore(&self, node: &Node) -> Result<RestoreOutcome, NodeError> {
        self.restore_kind(node, InterruptionKind::InstanceStopping, true)
            .await
    }

    /// Takes back what nth did to a node for an interruption of `kind` whose instance stays
    /// (a stop that ended, a maintenance reboot that happened or was cancelled): the kind's
    /// taint and nth's annotations go, and the cordon too when `uncordon`. `uncordon` is false
    /// when someone else had cordoned the node before nth marked it: their cordon stays. A
    /// node nth marked for another kind (or not at all) is left as it is.
    #[instrument(skip_all, fields(node = node.metadata.name.as_deref().unwrap_or_default(), kind = %kind))]
    pub async fn restore_kind(
        &self,
        node: &Node,
        kind: InterruptionKind,
        uncordon: bool,
    ) -> Result<RestoreOutcome, NodeError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if annotation(node, &self.policy.kind_annotation()) != Some(kind.as_str()) {
            info!(node = %name, "node was not marked by nth for this kind; leaving it alone");
            return Ok(RestoreOutcome::NotOurs);
        }
        let mut patch = json!({
            "metadata": {"annotations": {
                self.policy.event_annotation(): null,
                self.policy.kind_annotation(): null,
                self.policy.drained_annotation(): null,
                self.policy.continuing_annotation(): null,
            }},
            "spec": {
                "taints": [{"key": self.policy.taint_key(kind), "$patch": "delete"}],
            },
        });
        if uncordon {
            patch["spec"]["unschedulable"] = serde_json::Value::Null;
        }
        if self.policy.exclude_from_load_balancers {
            patch["metadata"]["labels"] = json!({ EXCLUDE_LB_LABEL: null });
        }
        if self.policy.out_of_service_taint {
            if let Some(taints) = patch["spec"]["taints"].as_array_mut() {
                taints.push(json!({"key": OUT_OF_SERVICE_TAINT, "$patch": "delete"}));
            }
        }
        if !self.patch(&name, patch).await? {
            return Ok(RestoreOutcome::DryRun);
        }
        info!(node = %name, uncordon, "node restored: nth's taint and annotations removed");
        Ok(RestoreOutcome::Restored)
    }

    fn mark_patch(
        &self,
        interruption: &Interruption,
        taint: Option<&str>,
        cordon: bool,
        draining: bool,
    ) -> serde_json::Value {
        let mut spec = serde_json::Map::new();
        if cordon {
            spec.insert("unschedulable".into(), json!(true));
        }
        if let Some(key) = taint {
            spec.insert(
                "taints".into(),
                json!([{
                    "key": key,
                    "value": taint_value(&interruption.id),
                    "effect": self.policy.taint_effect.as_str(),
                }]),
            );
        }
        let mut patch = json!({
            "metadata": { "annotations": {
                self.policy.event_annotation(): interruption.id,
                self.policy.kind_annotation(): interruption.kind.as_str(),
            }},
            "spec": spec,
        });
        if draining && self.policy.exclude_from_load_balancers {
            patch["metadata"]["labels"] = json!({ EXCLUDE_LB_LABEL: "true" });
        }
        patch
    }

    fn already_marked(
        &self,
        node: &Node,
        interruption: &Interruption,
        taint: Option<&str>,
        cordon: bool,
    ) -> bool {
        let annotated =
            annotation(node, &self.policy.event_annotation()) == Some(interruption.id.as_str());
        let spec = node.spec.as_ref();
        let cordoned = !cordon || spec.and_then(|s| s.unschedulable).unwrap_or(false);
        let tainted = taint.is_none_or(|key| {
            spec.and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == key))
        });
        annotated && cordoned && tainted
    }
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn node_provider_id(node: &Node) -> Option<&str> {
    node.spec.as_ref()?.provider_id.as_deref()
}

/// Taint values must be valid label values (at most 63 characters of `[A-Za-z0-9_.-]`,
/// alphanumeric at both ends); event ids usually are, and anything else is cut to fit.
fn taint_value(id: &str) -> String {
    let cleaned: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_id_matches_the_instance_not_a_prefix_of_it() {
        assert!(provider_id_matches(
            "aws:///us-east-1a/i-0b662ef9931388ba0",
            "i-0b662ef9931388ba0"
        ));
        assert!(!provider_id_matches(
            "aws:///us-east-1a/i-0b662ef9931388ba01",
            "i-0b662ef9931388ba0"
        ));
        assert!(!provider_id_matches("", "i-1"));
    }

    #[test]
    fn taint_values_are_valid_label_values() {
        assert_eq!(
            taint_value("1e5527d7-bb36-4607-3370-4164db56a40e"),
            "1e5527d7-bb36-4607-3370-4164db56a40e"
        );
        assert_eq!(taint_value("a:b/c"), "a-b-c");
        assert_eq!(taint_value(&"x".repeat(80)).len(), 63);
        assert_eq!(taint_value("-x-"), "x");
    }
}
