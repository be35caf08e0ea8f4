//! What the agent must undo after scheduled maintenance, kept on the node itself so that it
//! survives the reboot that restarts the agent: the event and the boot the node was in when
//! it was drained. Whether the cordon is nth's to lift is recorded by the node marks
//! themselves (`nth_core::node`).

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use nth_core::node::FIELD_MANAGER;
use nth_core::Policy;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("writing the maintenance record on node {node}: {source}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// The annotation's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebootRecord {
    pub event_id: String,
    /// `status.nodeInfo.bootID` when the node was drained; another value means it rebooted.
    pub boot_id: String,
}

impl RebootRecord {
    /// Has the node booted again since it was drained?
    pub fn rebooted(&self, node: &Node) -> bool {
        boot_id(node).is_some_and(|now| !now.is_empty() && now != self.boot_id)
    }
}

pub fn boot_id(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .node_info
        .as_ref()
        .map(|i| i.boot_id.as_str())
}

/// Reads and writes the record annotation, `<prefix>/restore-after-maintenance`.
#[derive(Clone)]
pub struct RebootRecords {
    nodes: Api<Node>,
    key: String,
    dry_run: bool,
}

impl std::fmt::Debug for RebootRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebootRecords")
            .field("key", &self.key)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

impl RebootRecords {
    pub fn new(client: Client, policy: &Policy) -> Self {
        Self {
            nodes: Api::all(client),
            key: format!("{}/restore-after-maintenance", policy.prefix),
            dry_run: policy.dry_run,
        }
    }

    /// The node's record; one that cannot be read is treated as absent (and logged), as a
    /// record nth did not write would be.
    pub fn read(&self, node: &Node) -> Option<RebootRecord> {
        let value = node.metadata.annotations.as_ref()?.get(&self.key)?;
        serde_json::from_str(value)
            .inspect_err(|error| info!(%error, value, "ignoring an unreadable maintenance record"))
            .ok()
    }

    /// Writes the record; the node as the server answered, so that the marks written next
    /// carry its new resourceVersion (`None` in a dry run).
    pub async fn write(
        &self,
        node: &str,
        record: &RebootRecord,
    ) -> Result<Option<Node>, RecordError> {
        let value = serde_json::to_string(record).unwrap_or_default();
        self.patch(
            node,
            json!({"metadata": {"annotations": {&self.key: value}}}),
        )
        .await
    }

    pub async fn clear(&self, node: &str) -> Result<(), RecordError> {
        self.patch(
            node,
            json!({"metadata": {"annotations": {&self.key: null}}}),
        )
        .await
        .map(drop)
    }

    async fn patch(
        &self,
        node: &str,
        patch: serde_json::Value,
    ) -> Result<Option<Node>, RecordError> {
        if self.dry_run {
            info!(node, patch = %patch, "dry run: would patch node");
            return Ok(None);
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.nodes
            .patch(node, &params, &Patch::Strategic(&patch))
            .await
            .map(Some)
            .map_err(|source| RecordError::Patch {
                node: node.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(boot: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {"nodeInfo": {
                "bootID": boot, "machineID": "", "systemUUID": "", "kernelVersion": "",
                "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"
            }}
        }))
        .expect("valid node")
    }

    #[test]
    fn a_new_boot_id_means_the_node_rebooted() {
        let record = RebootRecord {
            event_id: "e".into(),
            boot_id: "boot-1".into(),
        };
        assert!(!record.rebooted(&node("boot-1")));
        assert!(record.rebooted(&node("boot-2")));
        assert!(!record.rebooted(&node("")), "no boot ID known yet");
        let text = serde_json::to_string(&record).expect("serialises");
        assert!(text.contains("\"bootId\":\"boot-1\""), "{text}");
    }
}
