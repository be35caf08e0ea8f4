//! Finding a node and marking it: cordon, taint and annotation in one write, made from the
//! node as read and with its resourceVersion ([`marks`] computes what to write).

mod marks;

use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, instrument};

use crate::events::{Interruption, InterruptionKind};
use crate::policy::Policy;
use crate::retry;
use marks::{annotation, MarkRequest, Marks};
pub use marks::{EXCLUDE_LB_LABEL, OUT_OF_SERVICE_TAINT};

/// Page size when a node must be found by listing: large enough that a 5,000-node cluster is
/// a handful of requests, small enough that one page stays well inside a 128 MB Lambda.
const NODE_LIST_PAGE: u32 = 500;

/// The field manager nth's writes are recorded under, as `kubectl` records `kubectl-cordon`.
pub const FIELD_MANAGER: &str = "nth";

/// Writes made with a resourceVersion that lost to another writer (409) before giving up.
/// Each retry reads the node again first, so a retry loses only to a write made within one
/// round trip; five in a row means something rewrites the node continuously.
const CONFLICT_ATTEMPTS: u32 = 5;

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
    #[error("node {node} was deleted while nth was writing to it")]
    Gone { node: String },
    #[error("node {node} kept changing under nth's write: {attempts} conflicts (409) in a row")]
    Conflict { node: String, attempts: u32 },
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
    /// nth's marks are gone; `uncordoned` false when the cordon was not nth's to lift.
    Restored {
        uncordoned: bool,
    },
    /// nth did not mark this node for this kind of event: it is left alone.
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
    /// A node without `spec.providerID` is not taken for the instance by its name alone.
    require_provider_id: bool,
}

impl NodeMarker {
    pub fn new(client: Client, policy: Policy) -> Self {
        Self {
            nodes: Api::all(client),
            policy,
            require_provider_id: false,
        }
    }

    /// Accepts a node only when its `spec.providerID` names the instance. With several
    /// clusters served, the cluster comes from instance tags anyone allowed `ec2:CreateTags`
    /// can change, and in another cluster a node of the same name may be someone else's.
    pub fn requiring_provider_id(mut self) -> Self {
        self.require_provider_id = true;
        self
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
                let named = match node_provider_id(&node) {
                    Some(provider_id) => provider_id_matches(provider_id, instance_id),
                    None => !self.require_provider_id,
                };
                if named {
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

    /// Cordons, taints and annotates the node in one PATCH computed from the node as read
    /// (its taints kept, ours added) and made with its resourceVersion.
    #[instrument(skip_all, fields(event_id = %interruption.id, instance_id = %interruption.instance_id, node = node.metadata.name.as_deref().unwrap_or_default()))]
    pub async fn mark(
        &self,
        node: &Node,
        interruption: &Interruption,
        taint: Option<&str>,
        cordon: bool,
        draining: bool,
    ) -> Result<MarkOutcome, NodeError> {
        let request = MarkRequest {
            interruption,
            taint,
            cordon,
            draining,
        };
        let marks = Marks::new(&self.policy);
        if marks.already_marked(node, &request) {
            info!("node already carries this interruption's marks; nothing to patch");
            return Ok(MarkOutcome::AlreadyMarked);
        }
        let written = self
            .update(node.clone(), |current| {
                (!marks.already_marked(current, &request)).then(|| marks.mark(current, &request))
            })
            .await?;
        Ok(match written {
            Written::Applied => {
                info!(cordon, taint = taint.unwrap_or("none"), "node marked");
                MarkOutcome::Marked
            }
            Written::NothingToDo => MarkOutcome::AlreadyMarked,
            Written::DryRun => MarkOutcome::DryRun,
        })
    }

    /// Writes the change `compute` makes from the node as last read, with its resourceVersion;
    /// when someone else wrote in between (409), reads the node again and recomputes. `compute`
    /// returns `None` when the node needs no change.
    async fn update<F>(&self, mut node: Node, compute: F) -> Result<Written, NodeError>
    where
        F: Fn(&Node) -> Option<serde_json::Value>,
    {
        let name = node.metadata.name.clone().unwrap_or_default();
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let Some(patch) = compute(&node) else {
                return Ok(Written::NothingToDo);
            };
            match self.patch(&name, patch).await {
                Err(NodeError::Patch {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 409 && attempt < CONFLICT_ATTEMPTS => {
                    info!(node = %name, attempt, "node changed since it was read; reading it again");
                    node = self
                        .get(&name)
                        .await?
                        .ok_or_else(|| NodeError::Gone { node: name.clone() })?;
                }
                outcome => return outcome,
            }
        }
        Err(NodeError::Conflict {
            node: name,
            attempts: CONFLICT_ATTEMPTS,
        })
    }

    /// Applies a strategic-merge patch, or logs it in a dry run.
    async fn patch(&self, name: &str, patch: serde_json::Value) -> Result<Written, NodeError> {
        if self.policy.dry_run {
            info!(node = %name, patch = %patch, "dry run: would patch node");
            return Ok(Written::DryRun);
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        // A patch sets absolute values: applying it twice is applying it once; and one that
        // carries a resourceVersion is refused (409), not applied, if the node changed.
        let patch = Patch::Strategic(&patch);
        retry::idempotent("patch node", || self.nodes.patch(name, &params, &patch))
            .await
            .map_err(|source| NodeError::Patch {
                node: name.to_owned(),
                source,
            })?;
        Ok(Written::Applied)
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

    /// The token the next round of this node's continued drain must carry.
    pub fn continuation_token<'a>(&self, node: &'a Node) -> Option<&'a str> {
        annotation(node, &self.policy.continuation_token_annotation())
    }

    /// Records on the node that this interruption's drain goes on in another invocation,
    /// whose payload carries `token`. Annotations merge by key, so annotations of ours alone
    /// need no read first.
    pub async fn record_continuing(
        &self,
        node: &str,
        interruption: &Interruption,
        token: &str,
    ) -> Result<(), NodeError> {
        let patch = json!({"metadata": {"annotations": {
            self.policy.continuing_annotation(): interruption.id,
            self.policy.continuation_token_annotation(): token,
        }}});
        self.patch(node, patch).await.map(drop)
    }

    /// Forgets that a drain goes on elsewhere: the chain of invocations ended.
    pub async fn end_continuing(&self, node: &str) -> Result<(), NodeError> {
        let patch = json!({"metadata": {"annotations": {
            self.policy.continuing_annotation(): null,
            self.policy.continuation_token_annotation(): null,
        }}});
        self.patch(node, patch).await.map(drop)
    }

    /// Records on the node that this interruption's drain completed; with the out-of-service
    /// taint configured, it goes on beside the node's other taints in the same write (after
    /// a read).
    pub async fn record_drained(
        &self,
        node: &str,
        interruption: &Interruption,
    ) -> Result<(), NodeError> {
        // A drain continued across invocations ends here too.
        let annotations = json!({
            self.policy.drained_annotation(): interruption.id,
            self.policy.continuing_annotation(): null,
            self.policy.continuation_token_annotation(): null,
        });
        // A rebalance recommendation's instance keeps running: it is not out of service.
        let out_of_service = self.policy.out_of_service_taint
            && interruption.kind != InterruptionKind::RebalanceRecommendation;
        if !out_of_service {
            // Annotations merge by key: no read needed.
            let patch = json!({"metadata": {"annotations": annotations}});
            return self.patch(node, patch).await.map(drop);
        }
        // The taint joins the node's others: read, then one write with the annotations.
        let current = self.get(node).await?.ok_or_else(|| NodeError::Gone {
            node: node.to_owned(),
        })?;
        let marks = Marks::new(&self.policy);
        self.update(current, |n| {
            let mut patch = marks.out_of_service(n).unwrap_or_else(
                || json!({"metadata": {"resourceVersion": n.metadata.resource_version}}),
            );
            for (key, value) in annotations.as_object().into_iter().flatten() {
                patch["metadata"]["annotations"][key] = value.clone();
            }
            Some(patch)
        })
        .await
        .map(drop)
    }

    /// Takes back what nth did to a node whose instance stays (a stop that ended, a
    /// maintenance reboot that happened or was cancelled), if nth marked it for `kind`: every
    /// taint and annotation of nth's goes, whatever kind of event put it there, and the
    /// cordon, the load-balancer label and the out-of-service taint only where nth set them.
    /// `allow_uncordon` false keeps the cordon in any case. A node nth marked for another
    /// kind (or not at all) is left as it is.
    #[instrument(skip_all, fields(node = node.metadata.name.as_deref().unwrap_or_default(), kind = %kind))]
    pub async fn restore(
        &self,
        node: &Node,
        kind: InterruptionKind,
        allow_uncordon: bool,
    ) -> Result<RestoreOutcome, NodeError> {
        if annotation(node, &self.policy.kind_annotation()) != Some(kind.as_str()) {
            info!("node was not marked by nth for this kind; leaving it alone");
            return Ok(RestoreOutcome::NotOurs);
        }
        let marks = Marks::new(&self.policy);
        let uncordons = std::cell::Cell::new(false);
        let written = self
            .update(node.clone(), |current| {
                marks.any(current).then(|| {
                    let restore = marks.restore(current, allow_uncordon);
                    uncordons.set(restore.uncordons);
                    restore.patch
                })
            })
            .await?;
        let uncordons = uncordons.get();
        Ok(match written {
            Written::Applied => {
                info!(uncordoned = uncordons, "node restored: nth's marks removed");
                RestoreOutcome::Restored {
                    uncordoned: uncordons,
                }
            }
            Written::NothingToDo => RestoreOutcome::NotOurs,
            Written::DryRun => RestoreOutcome::DryRun,
        })
    }
}

/// What one optimistic write did.
enum Written {
    Applied,
    NothingToDo,
    DryRun,
}

fn node_provider_id(node: &Node) -> Option<&str> {
    node.spec.as_ref()?.provider_id.as_deref()
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
}
