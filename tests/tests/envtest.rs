//! The real control plane backend (the envtest binaries in `KUBEBUILDER_ASSETS`): EKS tokens
//! judged through the token webhook, permissions by RBAC from the shipped manifests, and a
//! seeded cluster the real disruption controller and the kubelet stand-in act on. Each test
//! skips when `KUBEBUILDER_ASSETS` is unset.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use aws_credential_types::Credentials;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, PostParams};
use nth_tests::envtest::{ControlPlane, EKS_USERNAME};
use nth_tests::fixtures;
use nth_tests::kube::state::is_ready;
use nth_tests::kube::Behaviour;
use nth_tests::sandbox::CLUSTER;
use nth_tests::{TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, TEST_SESSION_TOKEN};
use serde_json::json;

fn plane() -> Option<&'static ControlPlane> {
    match ControlPlane::shared() {
        Ok(Some(plane)) => Some(plane),
        Ok(None) => {
            eprintln!("skipped: KUBEBUILDER_ASSETS is unset, so there is no real control plane");
            None
        }
        Err(error) => panic!("{error:#}"),
    }
}

/// The status code and message of the API error `result` must be.
fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.message),
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

async fn eventually<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let began = Instant::now();
    while !done().await? {
        anyhow::ensure!(
            began.elapsed() < Duration::from_secs(30),
            "{what}: not after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn eks_tokens_go_through_the_webhook_and_rbac_decides() -> anyhow::Result<()> {
    let Some(plane) = plane() else {
        return Ok(());
    };
    eprintln!(
        "control plane started in {:?}; resident memory (KiB): {:?}",
        plane.started_in,
        plane.memory_kib()
    );
    let lease = plane.lease().await?;
    eprintln!("wipe took {:?}", lease.wipe_took());
    let cluster = lease.cluster(Behaviour::default()).await?;
    let node = "ip-10-0-1-1.ec2.internal";
    cluster
        .add_node(fixtures::node(node, "i-0aaaaaaaaaaaaaaa1", "us-east-1a"))
        .await?;

    // Dated a minute back so that no other test has the same token: the API server keeps
    // an accepted token for 10 s without asking the webhook again.
    let token = nth_lambda::token::presign_token(
        CLUSTER,
        TEST_REGION,
        Credentials::new(
            TEST_ACCESS_KEY,
            TEST_SECRET_KEY,
            Some(TEST_SESSION_TOKEN.to_owned()),
            None,
            "nth-tests",
        ),
        SystemTime::now() - Duration::from_secs(60),
    )?;
    let nth = plane.client_with_token(&token)?;
    let nodes = Api::<Node>::all(nth.clone())
        .list(&ListParams::default())
        .await?;
    assert_eq!(nodes.items.len(), 1, "the wipe left nodes behind");
    assert_eq!(cluster.tokens_seen(), [token]);
    assert!(cluster.auth_failures().is_empty());

    let garbled = plane.client_with_token("k8s-aws-v1.bm90LWEtdXJs")?;
    let (code, message) = refusal(Api::<Node>::all(garbled).list(&ListParams::default()).await);
    assert_eq!(code, 401, "{message}");
    let other_cluster = plane.eks_client("another-cluster")?;
    let (code, message) = refusal(
        Api::<Node>::all(other_cluster)
            .list(&ListParams::default())
            .await,
    );
    assert_eq!(code, 401, "{message}");
    let failures = cluster.auth_failures();
    assert!(failures[0].contains("not a URL"), "{failures:?}");
    assert!(
        failures[1].contains("signature does not match"),
        "{failures:?}"
    );

    // deploy/rbac.yaml grants get, list and patch on nodes, not delete.
    let (code, message) = refusal(
        Api::<Node>::all(nth)
            .delete(node, &DeleteParams::default())
            .await,
    );
    assert_eq!(code, 403, "{message}");
    assert!(message.contains(EKS_USERNAME), "{message}");

    // The agent gets its own node by name but may not list nodes.
    let kubeconfig = serde_json::from_value(plane.agent_kubeconfig())?;
    let agent = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?,
    )?;
    Api::<Node>::all(agent.clone()).get(node).await?;
    let (code, message) = refusal(Api::<Node>::all(agent).list(&ListParams::default()).await);
    assert_eq!(code, 403, "{message}");
    Ok(())
}

#[tokio::test]
async fn the_disruption_controller_paces_evictions_and_the_stand_in_replaces_pods(
) -> anyhow::Result<()> {
    let Some(plane) = plane() else {
        return Ok(());
    };
    let spare = "ip-10-0-9-9.ec2.internal";
    let lease = plane.lease().await?;
    eprintln!("wipe took {:?}", lease.wipe_took());
    let cluster = lease
        .cluster(Behaviour {
            spare_node: Some(spare.to_owned()),
            replacement_ready_delay: Duration::from_secs(2),
            ..Behaviour::default()
        })
        .await?;
    let node = "ip-10-0-2-1.ec2.internal";
    cluster
        .add_node(fixtures::node(node, "i-0bbbbbbbbbbbbbbb1", "us-east-1b"))
        .await?;
    cluster
        .add_node(fixtures::node(spare, "i-0bbbbbbbbbbbbbbb9", "us-east-1b"))
        .await?;
    for index in 0..2 {
        cluster
            .add_pod(fixtures::replicaset_pod(
                "shop", "web-7d9f", index, node, "web",
            ))
            .await?;
    }
    cluster
        .add_pod(fixtures::daemonset_pod("kube-system", "aws-node", node))
        .await?;
    cluster
        .add_pod(fixtures::mirror_pod("kube-system", "kube-proxy", node))
        .await?;
    cluster
        .add_pdb(fixtures::pdb_max_unavailable("shop", "web", "web", 1))
        .await?;

    let read = cluster.node(node).await?.context("the node is gone")?;
    assert_eq!(read["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(read["status"]["conditions"][0]["status"], "True");
    let pods = cluster.pods_on(node).await?;
    assert_eq!(pods.len(), 4);
    assert!(pods.iter().all(is_ready), "{pods:#?}");

    Api::<Event>::namespaced(plane.admin_client(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"generateName": format!("{node}.")},
                "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node},
                "reason": "NodeNotReady", "message": "seeded", "type": "Normal",
            }))?,
        )
        .await?;
    assert_eq!(cluster.event_reasons(node).await?, ["NodeNotReady"]);

    let budgets = &Api::<PodDisruptionBudget>::namespaced(plane.admin_client(), "shop");
    eventually(
        "the disruption controller allows one disruption",
        move || async move {
            let budget = budgets.get("web").await?;
            Ok(budget.status.is_some_and(|s| s.disruptions_allowed == 1))
        },
    )
    .await?;

    let shop = &Api::<Pod>::namespaced(plane.eks_client(CLUSTER)?, "shop");
    shop.evict("web-7d9f-00000", &EvictParams::default())
        .await?;
    let (code, message) = refusal(shop.evict("web-7d9f-00001", &EvictParams::default()).await);
    assert_eq!(code, 429, "{message}");
    eprintln!("second eviction: {code} {message}");
    let refused_at = Instant::now();
    eventually("the second eviction is accepted", move || async move {
        match shop.evict("web-7d9f-00001", &EvictParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 429 => Ok(false),
            Err(error) => Err(error.into()),
        }
    })
    .await?;
    assert!(
        refused_at.elapsed() >= Duration::from_secs(1),
        "accepted before the replacement could turn Ready"
    );

    let cluster = &cluster;
    eventually(
        "the kubelet stand-in removes the evicted pods",
        move || async move {
            Ok(cluster
                .pods_on(node)
                .await?
                .iter()
                .all(|p| p["metadata"]["labels"]["app"] != "web"))
        },
    )
    .await?;
    eventually(
        "both replacements turn Ready on the spare node",
        move || async move {
            let replacements = cluster.pods_on(spare).await?;
            Ok(replacements.len() == 2 && replacements.iter().all(is_ready))
        },
    )
    .await?;
    assert_eq!(cluster.pdb_min_healthy("shop", "web"), Some(1));
    Ok(())
}

#[tokio::test]
async fn a_pod_evicted_without_grace_goes_at_once_and_its_replacement_waits_for_a_node(
) -> anyhow::Result<()> {
    let Some(plane) = plane() else {
        return Ok(());
    };
    let cluster = plane.lease().await?.cluster(Behaviour::default()).await?;
    let node = "ip-10-0-3-1.ec2.internal";
    cluster
        .add_node(fixtures::node(node, "i-0ccccccccccccccc1", "us-east-1c"))
        .await?;
    cluster
        .add_pod(fixtures::replicaset_pod("jobs", "api-5c4b", 0, node, "api"))
        .await?;

    // Built by hand, as nth's drain does: kube's `evict` sends its delete options as
    // `delete_options`, which the real server ignores (the pod then gets its own 30 s).
    let eviction = json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": "api-5c4b-00000", "namespace": "jobs"},
        "deleteOptions": {"gracePeriodSeconds": 0},
    });
    let request = http::Request::post("/api/v1/namespaces/jobs/pods/api-5c4b-00000/eviction")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&eviction)?)?;
    plane.eks_client(CLUSTER)?.request_text(request).await?;
    let left = cluster.pods_on(node).await?;
    assert!(left.is_empty(), "{left:#?}");

    let jobs = &Api::<Pod>::namespaced(plane.admin_client(), "jobs");
    eventually(
        "the ReplicaSet stand-in replaces the pod",
        move || async move {
            let replacement = jobs.get_opt("api-5c4b-r00001").await?;
            Ok(replacement.is_some_and(|p| p.status.is_some_and(|s| s.conditions.is_some())))
        },
    )
    .await?;
    let replacement = serde_json::to_value(jobs.get("api-5c4b-r00001").await?)?;
    assert_eq!(replacement["status"]["phase"], "Pending");
    assert!(replacement["spec"]["nodeName"].is_null());
    assert!(!is_ready(&replacement));
    Ok(())
}
