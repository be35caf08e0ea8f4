//! deploy/admission-policy.yaml on the real control plane: the API server itself holds nth's
//! identities (the function's EKS group, the agent's ServiceAccount) to nth's own fields of a
//! node and to finished pods, and nth's real writes (core's `NodeMarker` and `Drainer` with the
//! function's client) pass it. Real backend only: the emulator has no admission.
//!
//! The plane is v1.28, where the policy API is `admissionregistration.k8s.io/v1beta1` (the
//! rig's API server serves it); the manifest is applied with that apiVersion when the server
//! has no `v1`. Node-bound service account tokens (`authentication.kubernetes.io/node-name`,
//! 1.30+) do not exist on 1.28: the rule that reads them is exercised by impersonating that
//! extra as cluster-admin, which puts it in `request.userInfo.extra` exactly as such a token
//! would.

use std::time::{Duration, Instant};

use chrono::Utc;
use http::{HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, EvictParams, Patch, PatchParams};
use nth_core::node::{EXCLUDE_LB_LABEL, OUT_OF_SERVICE_TAINT};
use nth_core::{
    DrainDeadline, DrainSettings, Drainer, Interruption, InterruptionKind, NodeMarker, Policy,
    RestoreOutcome,
};
use nth_tests::cluster::{Backend, Cluster};
use nth_tests::envtest::ControlPlane;
use nth_tests::envtest::{EKS_GROUP, EKS_USERNAME};
use nth_tests::fixtures::{self, foreign_marks_kept, our_taint_keys, FOREIGN_TAINTS};
use nth_tests::kube::{AuthConfig, Behaviour};
use nth_tests::TEST_SECRET_KEY;
use serde_json::{json, Value};

const CLUSTER: &str = "admission";
const NODE: &str = "ip-10-0-7-7.ec2.internal";
const OTHER_NODE: &str = "ip-10-0-7-8.ec2.internal";
const PREFIX: &str = "node-termination-handler";
const NS: &str = "apps";
const AGENT_USER: &str = "system:serviceaccount:kube-system:nth-agent";
/// How long the API server may take to load or drop a policy (its informer's lag).
const POLICY_PATIENCE: Duration = Duration::from_secs(30);

macro_rules! real_only {
    () => {
        if !Backend::real_available()? {
            eprintln!("skipped: KUBEBUILDER_ASSETS is not set, so there is no real control plane");
            return Ok(());
        }
    };
}

async fn cluster_with_nodes() -> anyhow::Result<Cluster> {
    let cluster = Cluster::start(
        Backend::Real,
        AuthConfig {
            cluster_name: CLUSTER.to_owned(),
            secret_access_key: Some(TEST_SECRET_KEY.to_owned()),
        },
        Behaviour::default(),
    )
    .await?;
    cluster
        .add_node(fixtures::node(NODE, "i-0aaaaaaaaaaaaaaa7", "us-east-1a"))
        .await?;
    cluster
        .add_node(fixtures::node(
            OTHER_NODE,
            "i-0aaaaaaaaaaaaaaa8",
            "us-east-1a",
        ))
        .await?;
    Ok(cluster)
}

fn plane(cluster: &Cluster) -> &'static ControlPlane {
    cluster.real().expect("the real backend").plane()
}

fn ensure_ok(output: &std::process::Output, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The shipped manifest, with the apiVersion this server serves the policy API under.
fn manifest_for(plane: &ControlPlane) -> anyhow::Result<String> {
    let shipped =
        std::fs::read_to_string(nth_tests::workspace_root().join("deploy/admission-policy.yaml"))?;
    let v1 = plane.kubectl(&["get", "--raw", "/apis/admissionregistration.k8s.io/v1"])?;
    ensure_ok(&v1, "reading admissionregistration.k8s.io/v1")?;
    if String::from_utf8_lossy(&v1.stdout).contains("\"validatingadmissionpolicies\"") {
        return Ok(shipped);
    }
    Ok(shipped.replace(
        "apiVersion: admissionregistration.k8s.io/v1\n",
        "apiVersion: admissionregistration.k8s.io/v1beta1\n",
    ))
}

/// Whether the function may (per the admission policy) add a foreign label to `NODE` now: a
/// server-side dry run, through impersonation so that it can run from a `Drop`.
fn probe_refused(plane: &ControlPlane) -> anyhow::Result<bool> {
    let output = plane.kubectl(&[
        "label",
        "node",
        NODE,
        "probe.example.com/admission=1",
        "--overwrite",
        "--dry-run=server",
        "--as",
        EKS_USERNAME,
        "--as-group",
        EKS_GROUP,
    ])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        return Ok(false);
    }
    anyhow::ensure!(
        stderr.contains("ValidatingAdmissionPolicy 'nth-node-writes'"),
        "the probe failed otherwise: {stderr}"
    );
    Ok(true)
}

fn wait_for_policy(plane: &ControlPlane, enforced: bool) -> anyhow::Result<()> {
    let began = Instant::now();
    while probe_refused(plane)? != enforced {
        anyhow::ensure!(
            began.elapsed() < POLICY_PATIENCE,
            "the API server never {} the policy",
            if enforced { "enforced" } else { "dropped" }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// deploy/admission-policy.yaml applied for as long as it lives, and enforced; dropping it
/// deletes the policies again (the lease's wipe leaves them alone) and waits until the server
/// no longer applies them, whatever the test did meanwhile. Take it while holding the lease
/// (with `NODE` seeded), and drop it before the cluster.
struct PolicyApplied {
    plane: &'static ControlPlane,
    file: std::path::PathBuf,
}

impl PolicyApplied {
    fn take(plane: &'static ControlPlane) -> anyhow::Result<Self> {
        let file = plane.dir.join("admission-policy.yaml");
        std::fs::write(&file, manifest_for(plane)?)?;
        // The guard first: a failure from here on still removes the policy.
        let guard = Self { plane, file };
        let path = guard.file.display().to_string();
        ensure_ok(
            &plane.kubectl(&["apply", "-f", &path])?,
            "applying deploy/admission-policy.yaml",
        )?;
        wait_for_policy(plane, true)?;
        Ok(guard)
    }
}

impl Drop for PolicyApplied {
    fn drop(&mut self) {
        let path = self.file.display().to_string();
        let removed = self
            .plane
            .kubectl(&["delete", "--ignore-not-found", "-f", &path])
            .and_then(|out| ensure_ok(&out, "deleting the policies"))
            .and_then(|()| wait_for_policy(self.plane, false));
        if let Err(error) = removed {
            // Not a panic: this may run while the test unwinds.
            eprintln!("removing the admission policies failed: {error:#}");
        }
    }
}

fn apply_policy(cluster: &Cluster) -> anyhow::Result<PolicyApplied> {
    tokio::task::block_in_place(|| PolicyApplied::take(plane(cluster)))
}

fn release(applied: PolicyApplied) {
    tokio::task::block_in_place(|| drop(applied));
}

/// The refusal's message, when `result` is the policy `policy` refusing the request.
fn refused_by<T: std::fmt::Debug>(
    result: Result<T, kube::Error>,
    policy: &str,
) -> anyhow::Result<String> {
    match result {
        Err(kube::Error::Api(status))
            if status.code == 403
                && status
                    .message
                    .contains(&format!("ValidatingAdmissionPolicy '{policy}'")) =>
        {
            Ok(status.message.clone())
        }
        other => anyhow::bail!("expected {policy} to refuse the request, got {other:?}"),
    }
}

async fn patch(client: &kube::Client, node: &str, patch: Value) -> Result<Node, kube::Error> {
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
}

async fn read(cluster: &Cluster, node: &str) -> anyhow::Result<Value> {
    Ok(cluster.node(node).await?.expect("the node exists"))
}

fn taints(node: &Value) -> Vec<Value> {
    node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn interruption(id: &str, kind: InterruptionKind) -> Interruption {
    Interruption {
        id: id.to_owned(),
        kind,
        instance_id: "i-0aaaaaaaaaaaaaaa7".to_owned(),
        event_time: Utc::now(),
        deadline: None,
        detail: String::new(),
        lifecycle: None,
    }
}

/// A client acting as the agent's ServiceAccount (its static token).
async fn agent_client(cluster: &Cluster) -> anyhow::Result<kube::Client> {
    let kubeconfig = serde_json::from_value(plane(cluster).agent_kubeconfig())?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// A client acting as the agent's ServiceAccount holding a token bound to `node`, as the API
/// server of 1.30+ authenticates one: cluster-admin impersonating the user, its groups and
/// the `authentication.kubernetes.io/node-name` extra.
async fn agent_bound_to(cluster: &Cluster, node: &str) -> anyhow::Result<kube::Client> {
    let path = plane(cluster).dir.join("admin.kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    for (name, value) in [
        ("impersonate-user", AGENT_USER),
        ("impersonate-group", "system:serviceaccounts"),
        ("impersonate-group", "system:serviceaccounts:kube-system"),
        ("impersonate-group", "system:authenticated"),
        // The extra's key, percent-encoded as header names cannot hold a '/'.
        (
            "impersonate-extra-authentication.kubernetes.io%2fnode-name",
            node,
        ),
    ] {
        config
            .headers
            .push((HeaderName::from_static(name), HeaderValue::from_str(value)?));
    }
    Ok(kube::Client::try_from(config)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_writes_are_held_to_nths_own_fields() -> anyhow::Result<()> {
    real_only!();
    let cluster = cluster_with_nodes().await?;
    let applied = apply_policy(&cluster)?;
    let function = cluster.client(CLUSTER)?;

    // Cordon, an nth taint beside the foreign ones, an nth annotation, the LB label: allowed.
    let before = read(&cluster, NODE).await?;
    let mut next = taints(&before);
    next.push(json!({"key": format!("{PREFIX}/spot-itn"), "value": "e1", "effect": "NoSchedule"}));
    patch(
        &function,
        NODE,
        json!({
            "metadata": {
                "annotations": {format!("{PREFIX}/event-id"): "e1"},
                "labels": {EXCLUDE_LB_LABEL: "true"},
            },
            "spec": {"unschedulable": true, "taints": next},
        }),
    )
    .await?;
    let marked = read(&cluster, NODE).await?;
    assert_eq!(marked["spec"]["unschedulable"], true);
    assert_eq!(
        our_taint_keys(&marked, PREFIX),
        vec![format!("{PREFIX}/spot-itn")]
    );
    foreign_marks_kept(&marked).map_err(anyhow::Error::msg)?;

    // A foreign taint dropped from the list: refused, whatever else the write does.
    let without_foreign: Vec<Value> = taints(&marked)
        .into_iter()
        .filter(|t| t["key"] != FOREIGN_TAINTS[0].0)
        .collect();
    let message = refused_by(
        patch(
            &function,
            NODE,
            json!({"spec": {"taints": without_foreign}}),
        )
        .await,
        "nth-node-writes",
    )?;
    assert!(message.contains("every other taint must stay"), "{message}");
    // A foreign taint's value changed: refused.
    let changed: Vec<Value> = taints(&marked)
        .into_iter()
        .map(|mut t| {
            if t["key"] == FOREIGN_TAINTS[0].0 {
                t["value"] = json!("other");
            }
            t
        })
        .collect();
    refused_by(
        patch(&function, NODE, json!({"spec": {"taints": changed}})).await,
        "nth-node-writes",
    )?;
    // A foreign label changed, one added: refused.
    let (label, _) = fixtures::FOREIGN_LABEL;
    let message = refused_by(
        patch(
            &function,
            NODE,
            json!({"metadata": {"labels": {label: "other"}}}),
        )
        .await,
        "nth-node-writes",
    )?;
    assert!(message.contains("every other label must stay"), "{message}");
    refused_by(
        patch(
            &function,
            NODE,
            json!({"metadata": {"labels": {"new.example.com/x": "1"}}}),
        )
        .await,
        "nth-node-writes",
    )?;
    // A foreign annotation removed: refused.
    let (annotation, _) = fixtures::FOREIGN_ANNOTATION;
    let message = refused_by(
        patch(
            &function,
            NODE,
            json!({"metadata": {"annotations": {annotation: null}}}),
        )
        .await,
        "nth-node-writes",
    )?;
    assert!(
        message.contains("every other annotation must stay"),
        "{message}"
    );
    // Another spec field: refused.
    let message = refused_by(
        patch(&function, NODE, json!({"spec": {"podCIDR": "10.8.0.0/24"}})).await,
        "nth-node-writes",
    )?;
    assert!(message.contains("nothing else"), "{message}");

    // The agent's ServiceAccount is held alike: its own annotation yes, a foreign label no.
    let agent = agent_client(&cluster).await?;
    patch(
        &agent,
        NODE,
        json!({"metadata": {"annotations": {format!("{PREFIX}/restore-after-maintenance"): "{}"}}}),
    )
    .await?;
    refused_by(
        patch(
            &agent,
            NODE,
            json!({"metadata": {"labels": {label: "other"}}}),
        )
        .await,
        "nth-node-writes",
    )?;
    // Everyone else is not judged: an operator (cluster-admin) changes the foreign label.
    cluster
        .patch_node(
            NODE,
            json!({"metadata": {"labels": {"operator.example.com/x": "1"}}}),
        )
        .await?;
    let after = read(&cluster, NODE).await?;
    foreign_marks_kept(&after).map_err(anyhow::Error::msg)?;
    assert_eq!(
        taints(&after),
        taints(&marked),
        "no refused write got through"
    );

    // nth's own marking path, with the function's client, passes: mark (cordon, taint,
    // annotations, LB label), drained with the out-of-service taint, restore.
    let policy = Policy {
        exclude_from_load_balancers: true,
        out_of_service_taint: true,
        ..Policy::default()
    };
    let marker = NodeMarker::new(function.clone(), policy);
    let node = marker.get(OTHER_NODE).await?.expect("the node exists");
    let stop = interruption("adm-1", InterruptionKind::InstanceStopping);
    let key = format!("{PREFIX}/instance-stopping");
    marker.mark(&node, &stop, Some(&key), true, true).await?;
    marker.record_drained(OTHER_NODE, &stop).await?;
    let marked = read(&cluster, OTHER_NODE).await?;
    assert_eq!(marked["spec"]["unschedulable"], true);
    assert_eq!(marked["metadata"]["labels"][EXCLUDE_LB_LABEL], "true");
    let ours = our_taint_keys(&marked, PREFIX);
    assert!(
        ours.contains(&key) && ours.contains(&OUT_OF_SERVICE_TAINT.to_owned()),
        "{ours:?}"
    );
    foreign_marks_kept(&marked).map_err(anyhow::Error::msg)?;
    let node = marker.get(OTHER_NODE).await?.expect("the node exists");
    let outcome = marker
        .restore(&node, InterruptionKind::InstanceStopping, true)
        .await?;
    assert_eq!(outcome, RestoreOutcome::Restored { uncordoned: true });
    let restored = read(&cluster, OTHER_NODE).await?;
    assert!(our_taint_keys(&restored, PREFIX).is_empty(), "{restored:#}");
    foreign_marks_kept(&restored).map_err(anyhow::Error::msg)?;

    release(applied);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_finished_pods_may_be_deleted_and_evictions_stay_allowed() -> anyhow::Result<()> {
    real_only!();
    let cluster = cluster_with_nodes().await?;
    let running = fixtures::replicaset_pod(NS, "web", 0, NODE, "web");
    let mut done = fixtures::replicaset_pod(NS, "job", 0, NODE, "job");
    done["status"] = json!({"phase": "Succeeded"});
    let mut failed = fixtures::replicaset_pod(NS, "cron", 0, NODE, "cron");
    failed["status"] = json!({"phase": "Failed"});
    for pod in [running, done, failed] {
        cluster.add_pod(pod).await?;
    }
    let applied = apply_policy(&cluster)?;
    let function = cluster.client(CLUSTER)?;
    let pods: Api<Pod> = Api::namespaced(function.clone(), NS);

    let message = refused_by(
        pods.delete("web-00000", &DeleteParams::default()).await,
        "nth-pod-deletes",
    )?;
    assert!(message.contains("only finished"), "{message}");
    let names: Vec<String> = cluster
        .pods_on(NODE)
        .await?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    assert!(
        names.contains(&"web-00000".to_owned()),
        "still there: {names:?}"
    );
    pods.delete("job-00000", &DeleteParams::default()).await?;
    // The agent too: its running pod no, a finished one yes.
    let agent: Api<Pod> = Api::namespaced(agent_client(&cluster).await?, NS);
    refused_by(
        agent.delete("web-00000", &DeleteParams::default()).await,
        "nth-pod-deletes",
    )?;
    agent.delete("cron-00000", &DeleteParams::default()).await?;
    // An eviction is a CREATE of pods/eviction: not a delete, allowed.
    pods.evict("web-00000", &EvictParams::default()).await?;

    // nth's drain with the function's client: finished pods deleted, the rest evicted.
    let mut done = fixtures::replicaset_pod(NS, "job2", 0, NODE, "job2");
    done["status"] = json!({"phase": "Succeeded"});
    cluster.add_pod(done).await?;
    cluster
        .add_pod(fixtures::replicaset_pod(NS, "api", 0, NODE, "api"))
        .await?;
    let report = Drainer::new(function.clone(), DrainSettings::default())
        .drain(
            NODE,
            DrainDeadline {
                pods_stopped_by: None,
                give_up_at: Utc::now() + chrono::Duration::seconds(60),
            },
        )
        .await?;
    assert_eq!(
        report.deleted,
        vec![format!("{NS}/job2-00000")],
        "{report:?}"
    );
    assert!(
        report.evicted.contains(&format!("{NS}/api-00000")),
        "{report:?}"
    );
    assert!(report.complete, "{report:?}");

    release(applied);
    Ok(())
}

// Node-bound tokens do not exist on the rig's v1.28: the extra they carry is impersonated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_to_a_node_writes_that_node_only() -> anyhow::Result<()> {
    real_only!();
    let cluster = cluster_with_nodes().await?;
    let mut done = fixtures::replicaset_pod(NS, "job", 0, NODE, "job");
    done["status"] = json!({"phase": "Succeeded"});
    cluster.add_pod(done).await?;
    let applied = apply_policy(&cluster)?;

    let elsewhere = agent_bound_to(&cluster, OTHER_NODE).await?;
    let here = agent_bound_to(&cluster, NODE).await?;
    let ours = json!({"metadata": {"annotations": {format!("{PREFIX}/event-id"): "b1"}}});
    let message = refused_by(
        patch(&elsewhere, NODE, ours.clone()).await,
        "nth-node-writes",
    )?;
    assert!(
        message.contains(&format!(
            "bound to node {OTHER_NODE} may write that node only"
        )),
        "{message}"
    );
    patch(&here, NODE, ours).await?;
    let message = refused_by(
        Api::<Pod>::namespaced(elsewhere, NS)
            .delete("job-00000", &DeleteParams::default())
            .await,
        "nth-pod-deletes",
    )?;
    assert!(message.contains("pods on that node only"), "{message}");
    Api::<Pod>::namespaced(here, NS)
        .delete("job-00000", &DeleteParams::default())
        .await?;

    release(applied);
    Ok(())
}
