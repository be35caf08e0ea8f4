//! Which pods a drain evicts, and in what order: `kubectl drain`'s rules plus the operator's
//! exclusions.

use k8s_openapi::api::core::v1::Pod;

use super::DrainSettings;

/// Pods at or above this priority are system-critical (`system-cluster-critical` is
/// 2,000,000,000, `system-node-critical` 2,000,001,000): evicted after everything else, as
/// the node needs its DNS and networking until its workloads have moved.
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// What the drain does with one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Disposition {
    Skip(String),
    /// Already terminating: wait for it, do not evict again.
    Wait,
    /// Finished: nothing to disrupt, delete it.
    Delete,
    Evict,
}

pub(super) fn disposition(pod: &Pod, settings: &DrainSettings) -> Disposition {
    let meta = &pod.metadata;
    let annotations = meta.annotations.as_ref();
    if annotations.is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")) {
        return Disposition::Skip("mirror pod (managed by the kubelet)".into());
    }
    let controller = meta
        .owner_references
        .as_ref()
        .and_then(|owners| owners.iter().find(|o| o.controller == Some(true)));
    if controller.is_some_and(|o| o.kind == "DaemonSet") {
        return Disposition::Skip("DaemonSet pod".into());
    }
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    if settings.exclude_namespaces.iter().any(|n| n == namespace) {
        return Disposition::Skip(format!("namespace {namespace} is excluded"));
    }
    if !settings.exclude_pod_labels.is_empty() {
        let labels = meta.labels.as_ref();
        let excluded = settings
            .exclude_pod_labels
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        if excluded {
            return Disposition::Skip("matches the excluded pod labels".into());
        }
    }
    if meta.deletion_timestamp.is_some() {
        return Disposition::Wait;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Disposition::Delete;
    }
    if controller.is_none() && !settings.evict_unmanaged {
        return Disposition::Skip(
            "no controller would recreate it (DRAIN_UNMANAGED_PODS=false)".into(),
        );
    }
    let uses_emptydir = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|vs| vs.iter().any(|v| v.empty_dir.is_some()));
    if uses_emptydir && !settings.evict_emptydir {
        return Disposition::Skip("uses emptyDir data (DRAIN_EMPTYDIR_PODS=false)".into());
    }
    Disposition::Evict
}

pub(super) fn is_system_critical(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.priority)
        .is_some_and(|p| p >= SYSTEM_CRITICAL_PRIORITY)
        || spec
            .and_then(|s| s.priority_class_name.as_deref())
            .is_some_and(|c| c == "system-cluster-critical" || c == "system-node-critical")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("test pod is valid")
    }

    fn owned(kind: &str) -> serde_json::Value {
        json!([{"apiVersion": "apps/v1", "kind": kind, "name": "x", "uid": "u", "controller": true}])
    }

    #[test]
    fn kubectl_drain_skips_mirror_and_daemonset_pods() {
        let s = DrainSettings::default();
        let mirror = pod(
            json!({"metadata": {"name": "kube-proxy-x", "annotations": {"kubernetes.io/config.mirror": "abc"}}}),
        );
        let ds =
            pod(json!({"metadata": {"name": "aws-node-x", "ownerReferences": owned("DaemonSet")}}));
        let rs =
            pod(json!({"metadata": {"name": "web-x", "ownerReferences": owned("ReplicaSet")}}));
        assert!(matches!(disposition(&mirror, &s), Disposition::Skip(_)));
        assert!(matches!(disposition(&ds, &s), Disposition::Skip(_)));
        assert_eq!(disposition(&rs, &s), Disposition::Evict);
    }

    #[test]
    fn terminating_pods_are_waited_for_and_finished_ones_deleted() {
        let s = DrainSettings::default();
        let terminating =
            pod(json!({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"}}));
        let done = pod(json!({"metadata": {"name": "b"}, "status": {"phase": "Succeeded"}}));
        assert_eq!(disposition(&terminating, &s), Disposition::Wait);
        assert_eq!(disposition(&done, &s), Disposition::Delete);
    }

    #[test]
    fn emptydir_and_bare_pods_are_evicted_unless_configured_otherwise() {
        let scratch = pod(
            json!({"metadata": {"name": "a", "ownerReferences": owned("ReplicaSet")},
            "spec": {"containers": [], "volumes": [{"name": "tmp", "emptyDir": {}}]}}),
        );
        let bare = pod(json!({"metadata": {"name": "b"}}));
        let defaults = DrainSettings::default();
        assert_eq!(disposition(&scratch, &defaults), Disposition::Evict);
        assert_eq!(disposition(&bare, &defaults), Disposition::Evict);
        let careful = DrainSettings {
            evict_emptydir: false,
            evict_unmanaged: false,
            ..DrainSettings::default()
        };
        assert!(
            matches!(disposition(&scratch, &careful), Disposition::Skip(r) if r.contains("emptyDir"))
        );
        assert!(
            matches!(disposition(&bare, &careful), Disposition::Skip(r) if r.contains("controller"))
        );
    }

    #[test]
    fn excluded_namespaces_and_labels_are_skipped() {
        let s = DrainSettings {
            exclude_namespaces: vec!["nth".into()],
            exclude_pod_labels: vec![("app".into(), "nth-agent".into())],
            ..DrainSettings::default()
        };
        let in_ns = pod(json!({"metadata": {"name": "a", "namespace": "nth"}}));
        let labelled = pod(
            json!({"metadata": {"name": "b", "namespace": "x", "labels": {"app": "nth-agent"}}}),
        );
        let other =
            pod(json!({"metadata": {"name": "c", "namespace": "x", "labels": {"app": "web"}}}));
        assert!(matches!(disposition(&in_ns, &s), Disposition::Skip(_)));
        assert!(matches!(disposition(&labelled, &s), Disposition::Skip(_)));
        assert_eq!(disposition(&other, &s), Disposition::Evict);
    }

    #[test]
    fn system_critical_pods_are_recognised_by_class_or_priority() {
        let by_class = pod(
            json!({"metadata": {"name": "coredns"}, "spec": {"containers": [], "priorityClassName": "system-cluster-critical"}}),
        );
        let by_value = pod(
            json!({"metadata": {"name": "x"}, "spec": {"containers": [], "priority": 2000001000}}),
        );
        let ordinary =
            pod(json!({"metadata": {"name": "web"}, "spec": {"containers": [], "priority": 0}}));
        assert!(is_system_critical(&by_class));
        assert!(is_system_critical(&by_value));
        assert!(!is_system_critical(&ordinary));
    }
}
