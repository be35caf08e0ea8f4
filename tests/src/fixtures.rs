//! Kubernetes objects as an EKS cluster has them, for seeding the emulator.

use serde_json::{json, Value};

/// Taints other teams and controllers put on nodes: nth must keep them through everything
/// it does, so every node the rig seeds carries them.
pub const FOREIGN_TAINTS: [(&str, &str); 2] =
    [("dedicated", "batch"), ("nvidia.com/gpu", "present")];
/// A label and an annotation of someone else's, on every seeded node for the same reason.
pub const FOREIGN_LABEL: (&str, &str) = ("team.example.com/owner", "batch");
pub const FOREIGN_ANNOTATION: (&str, &str) = (
    "cluster-autoscaler.kubernetes.io/scale-down-disabled",
    "true",
);

/// A Ready EKS node for an instance, named after its PrivateDnsName as EKS names them, with
/// other owners' taints, label and annotation on it.
pub fn node(name: &str, instance_id: &str, az: &str) -> Value {
    let taints: Vec<Value> = FOREIGN_TAINTS
        .iter()
        .map(|(key, value)| json!({"key": key, "value": value, "effect": "NoSchedule"}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": az,
                "node.kubernetes.io/instance-type": "m5.large",
                "eks.amazonaws.com/capacityType": "SPOT",
                FOREIGN_LABEL.0: FOREIGN_LABEL.1,
            },
            "annotations": { FOREIGN_ANNOTATION.0: FOREIGN_ANNOTATION.1 },
        },
        "spec": { "providerID": format!("aws:///{az}/{instance_id}"), "taints": taints },
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalDNS", "address": name}],
        },
    })
}

fn running_pod(namespace: &str, name: &str, node: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": labels },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "public.ecr.aws/docker/library/busybox:stable"}],
            "terminationGracePeriodSeconds": 30,
        },
        "status": { "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}] },
    })
}

fn owned_by(mut pod: Value, kind: &str, name: &str) -> Value {
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": kind, "name": name,
        "uid": format!("owner-{name}"), "controller": true, "blockOwnerDeletion": true,
    }]);
    pod
}

pub fn daemonset_pod(namespace: &str, daemonset: &str, node: &str) -> Value {
    // One per node: named after the node's first label, as unique as the node's own name.
    let name = format!("{daemonset}-{}", node.split('.').next().unwrap_or(node));
    owned_by(
        running_pod(namespace, &name, node, json!({"app": daemonset})),
        "DaemonSet",
        daemonset,
    )
}

/// A static pod's mirror, as the kubelet creates it.
pub fn mirror_pod(namespace: &str, name: &str, node: &str) -> Value {
    let mut pod = running_pod(
        namespace,
        &format!("{name}-{node}"),
        node,
        json!({"component": name}),
    );
    pod["metadata"]["annotations"] =
        json!({"kubernetes.io/config.mirror": "d41d8cd98f00b204e9800998ecf8427e"});
    pod
}

pub fn replicaset_pod(
    namespace: &str,
    replicaset: &str,
    index: usize,
    node: &str,
    app: &str,
) -> Value {
    owned_by(
        running_pod(
            namespace,
            &format!("{replicaset}-{index:05}"),
            node,
            json!({"app": app}),
        ),
        "ReplicaSet",
        replicaset,
    )
}

pub fn pdb_max_unavailable(namespace: &str, name: &str, app: &str, max_unavailable: i64) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "maxUnavailable": max_unavailable, "selector": { "matchLabels": { "app": app } } },
    })
}

/// Checks that every foreign taint, label and annotation [`node`] seeded is still on the node
/// exactly as it was; the error names what is missing.
pub fn foreign_marks_kept(node: &Value) -> Result<(), String> {
    let taints = node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (key, value) in FOREIGN_TAINTS {
        let kept = taints
            .iter()
            .any(|t| t["key"] == key && t["value"] == value && t["effect"] == "NoSchedule");
        if !kept {
            return Err(format!(
                "foreign taint {key}={value}:NoSchedule lost: {taints:?}"
            ));
        }
    }
    if node["metadata"]["labels"][FOREIGN_LABEL.0] != FOREIGN_LABEL.1 {
        return Err(format!("foreign label {} lost", FOREIGN_LABEL.0));
    }
    if node["metadata"]["annotations"][FOREIGN_ANNOTATION.0] != FOREIGN_ANNOTATION.1 {
        return Err(format!("foreign annotation {} lost", FOREIGN_ANNOTATION.0));
    }
    Ok(())
}

/// The keys of a node's own-prefix taints: what nth put there, leaving out the foreign ones
/// every seeded node carries.
pub fn our_taint_keys(node: &Value, prefix: &str) -> Vec<String> {
    taint_keys(node)
        .into_iter()
        .filter(|k| {
            k.starts_with(&format!("{prefix}/")) || k == "node.kubernetes.io/out-of-service"
        })
        .collect()
}

/// The keys of a node's taints, as `kubectl describe node` lists them.
pub fn taint_keys(node: &Value) -> Vec<String> {
    node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["key"].as_str().map(str::to_owned))
        .collect()
}
