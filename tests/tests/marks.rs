//! nth's node marks on both backends, through core's `NodeMarker` with the function's own
//! client (EKS token, the function's RBAC): every foreign taint, label and annotation kept, a
//! write made between our read and ours never lost (the 409 path), an operator's cordon never
//! lifted, and a restore that leaves no mark of ours.

use chrono::Utc;
use nth_core::node::{EXCLUDE_LB_LABEL, OUT_OF_SERVICE_TAINT};
use nth_core::{Interruption, InterruptionKind, NodeMarker, Policy, RestoreOutcome};
use nth_tests::cluster::{Backend, Cluster};
use nth_tests::fixtures::{self, foreign_marks_kept, our_taint_keys, taint_keys};
use nth_tests::kube::{AuthConfig, Behaviour};
use nth_tests::on_both_backends;
use nth_tests::TEST_SECRET_KEY;
use serde_json::{json, Value};

const CLUSTER: &str = "marks";
const NODE: &str = "ip-10-0-9-9.ec2.internal";
const PREFIX: &str = "node-termination-handler";

async fn cluster_with_node(backend: Backend) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start(
        backend,
        AuthConfig {
            cluster_name: CLUSTER.to_owned(),
            secret_access_key: Some(TEST_SECRET_KEY.to_owned()),
        },
        Behaviour::default(),
    )
    .await?;
    cluster
        .add_node(fixtures::node(NODE, "i-0123456789abcdef0", "us-east-1a"))
        .await?;
    Ok(cluster)
}

fn interruption(id: &str, kind: InterruptionKind) -> Interruption {
    Interruption {
        id: id.to_owned(),
        kind,
        instance_id: "i-0123456789abcdef0".to_owned(),
        event_time: Utc::now(),
        deadline: None,
        detail: String::new(),
        lifecycle: None,
    }
}

fn marker(cluster: &Cluster, policy: Policy) -> anyhow::Result<NodeMarker> {
    Ok(NodeMarker::new(cluster.client(CLUSTER)?, policy))
}

/// Another writer adds a taint the way a careful client does: the whole list, read first.
async fn add_foreign_taint(cluster: &Cluster, key: &str) -> anyhow::Result<()> {
    let node = cluster.node(NODE).await?.expect("the node exists");
    let mut taints = node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    taints.push(json!({"key": key, "value": "x", "effect": "NoSchedule"}));
    cluster
        .patch_node(NODE, json!({"spec": {"taints": taints}}))
        .await
}

fn annotations_of_ours(node: &Value) -> Vec<String> {
    node["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .filter(|k| k.starts_with(&format!("{PREFIX}/")))
        .collect()
}

on_both_backends! {
    async fn a_write_between_our_read_and_ours_is_kept(backend: Backend) -> anyhow::Result<()> {
        let cluster = cluster_with_node(backend).await?;
        let marker = marker(&cluster, Policy::default())?;
        let stale = marker.get(NODE).await?.expect("the node exists");
        add_foreign_taint(&cluster, "late.example.com/arrival").await?;

        let stop = interruption("st-1", InterruptionKind::InstanceStopping);
        let key = format!("{PREFIX}/instance-stopping");
        marker.mark(&stale, &stop, Some(&key), true, true).await?;

        let marked = cluster.node(NODE).await?.expect("node");
        foreign_marks_kept(&marked).map_err(anyhow::Error::msg)?;
        let keys = taint_keys(&marked);
        assert!(keys.contains(&"late.example.com/arrival".to_owned()), "{keys:?}");
        assert!(keys.contains(&key), "{keys:?}");
        assert_eq!(marked["spec"]["unschedulable"], true);

        // And again for the restore: a taint added after our read survives it.
        let stale = marker.get(NODE).await?.expect("node");
        add_foreign_taint(&cluster, "later.example.com/arrival").await?;
        let outcome = marker.restore(&stale, InterruptionKind::InstanceStopping, true).await?;
        assert_eq!(outcome, RestoreOutcome::Restored { uncordoned: true });
        let restored = cluster.node(NODE).await?.expect("node");
        foreign_marks_kept(&restored).map_err(anyhow::Error::msg)?;
        let keys = taint_keys(&restored);
        assert!(keys.contains(&"late.example.com/arrival".to_owned()), "{keys:?}");
        assert!(keys.contains(&"later.example.com/arrival".to_owned()), "{keys:?}");
        assert!(our_taint_keys(&restored, PREFIX).is_empty(), "{keys:?}");
        assert_ne!(restored["spec"]["unschedulable"], true, "our cordon lifted");
        assert!(annotations_of_ours(&restored).is_empty(), "{restored:#}");
        Ok(())
    }
}

on_both_backends! {
    async fn an_operators_cordon_survives_our_mark_and_restore(backend: Backend) -> anyhow::Result<()> {
        let cluster = cluster_with_node(backend).await?;
        cluster
            .patch_node(NODE, json!({"spec": {"unschedulable": true}}))
            .await?;
        let marker = marker(&cluster, Policy::default())?;
        let node = marker.get(NODE).await?.expect("node");
        let stop = interruption("st-2", InterruptionKind::InstanceStopping);
        marker
            .mark(&node, &stop, Some(&format!("{PREFIX}/instance-stopping")), true, true)
            .await?;
        let marked = marker.get(NODE).await?.expect("node");
        let outcome = marker.restore(&marked, InterruptionKind::InstanceStopping, true).await?;

        assert_eq!(outcome, RestoreOutcome::Restored { uncordoned: false });
        let restored = cluster.node(NODE).await?.expect("node");
        assert_eq!(restored["spec"]["unschedulable"], true, "the operator's cordon stays");
        foreign_marks_kept(&restored).map_err(anyhow::Error::msg)?;
        assert!(our_taint_keys(&restored, PREFIX).is_empty());
        assert!(annotations_of_ours(&restored).is_empty(), "{restored:#}");
        Ok(())
    }
}

on_both_backends! {
    async fn a_restore_takes_back_the_marks_of_every_kind_and_only_ours(backend: Backend) -> anyhow::Result<()> {
        let cluster = cluster_with_node(backend).await?;
        // The operator set the load-balancer label first: it is theirs, and stays.
        cluster
            .patch_node(NODE, json!({"metadata": {"labels": {EXCLUDE_LB_LABEL: "true"}}}))
            .await?;
        let policy = Policy {
            exclude_from_load_balancers: true,
            out_of_service_taint: true,
            ..Policy::default()
        };
        let marker = marker(&cluster, policy)?;
        let rebalance = interruption("rb-1", InterruptionKind::RebalanceRecommendation);
        let node = marker.get(NODE).await?.expect("node");
        marker
            .mark(&node, &rebalance, Some(&format!("{PREFIX}/rebalance-recommendation")), true, false)
            .await?;
        let stop = interruption("st-3", InterruptionKind::InstanceStopping);
        let node = marker.get(NODE).await?.expect("node");
        marker
            .mark(&node, &stop, Some(&format!("{PREFIX}/instance-stopping")), true, true)
            .await?;
        marker.record_drained(NODE, &stop).await?;

        let marked = cluster.node(NODE).await?.expect("node");
        foreign_marks_kept(&marked).map_err(anyhow::Error::msg)?;
        let ours = our_taint_keys(&marked, PREFIX);
        assert_eq!(ours.len(), 3, "rebalance, stop and out-of-service beside the foreign ones: {ours:?}");
        assert!(ours.contains(&OUT_OF_SERVICE_TAINT.to_owned()));

        let current = marker.get(NODE).await?.expect("node");
        let outcome = marker.restore(&current, InterruptionKind::InstanceStopping, true).await?;
        assert_eq!(outcome, RestoreOutcome::Restored { uncordoned: true });
        let restored = cluster.node(NODE).await?.expect("node");
        foreign_marks_kept(&restored).map_err(anyhow::Error::msg)?;
        assert!(our_taint_keys(&restored, PREFIX).is_empty(), "{restored:#}");
        assert!(annotations_of_ours(&restored).is_empty(), "{restored:#}");
        assert_ne!(restored["spec"]["unschedulable"], true);
        assert_eq!(
            restored["metadata"]["labels"][EXCLUDE_LB_LABEL], "true",
            "the label was the operator's before nth's mark"
        );
        Ok(())
    }
}
