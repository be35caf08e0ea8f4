//! The emulator against the real API server: the same requests, with the function's own
//! client (EKS token, its RBAC), sent to both; the status codes and the objects that result
//! must agree. Each request is one the function makes or one that catches a belief the
//! emulator once held and the server does not (taints merged by key, `$patch` honoured in an
//! atomic list, a stale resourceVersion accepted). Differences kept on purpose are listed in
//! tests/EMULATOR_DIFFERENCES.md.

use http::{Method, Request};
use nth_tests::cluster::{Backend, Cluster};
use nth_tests::fixtures;
use nth_tests::kube::{AuthConfig, Behaviour};
use nth_tests::TEST_SECRET_KEY;
use serde_json::{json, Value};

const CLUSTER: &str = "differential";
const NODE: &str = "ip-10-0-3-3.ec2.internal";
const OTHER: &str = "ip-10-0-3-4.ec2.internal";
const NS: &str = "diff";

/// One request and what to compare in its answer.
struct Step {
    what: &'static str,
    method: Method,
    path: String,
    content_type: &'static str,
    body: Value,
}

fn step(
    what: &'static str,
    method: Method,
    path: &str,
    content_type: &'static str,
    body: Value,
) -> Step {
    Step {
        what,
        method,
        path: path.to_owned(),
        content_type,
        body,
    }
}

fn node_path() -> String {
    format!("/api/v1/nodes/{NODE}")
}

fn eviction(pod: &str, grace: Option<i64>) -> Value {
    let mut body = json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": pod, "namespace": NS},
    });
    if let Some(grace) = grace {
        body["deleteOptions"] = json!({"gracePeriodSeconds": grace});
    }
    body
}

fn steps() -> Vec<Step> {
    const SMP: &str = "application/strategic-merge-patch+json";
    const MERGE: &str = "application/merge-patch+json";
    const JSON: &str = "application/json";
    let evict = |pod: &str| format!("/api/v1/namespaces/{NS}/pods/{pod}/eviction");
    vec![
        step("get the node", Method::GET, &node_path(), JSON, Value::Null),
        step(
            "a taint list replaces the atomic list",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"spec": {"taints": [{"key": "a", "value": "1", "effect": "NoSchedule"}]}}),
        ),
        step(
            "$patch: delete in an atomic list is a taint without an effect",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"spec": {"taints": [{"key": "a", "$patch": "delete"}]}}),
        ),
        step(
            "a stale resourceVersion is a conflict",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"metadata": {"resourceVersion": "1"}, "spec": {"unschedulable": true}}),
        ),
        step(
            "an unknown taint effect is invalid",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"spec": {"taints": [{"key": "b", "effect": "Sometimes"}]}}),
        ),
        step(
            "a taint twice is invalid",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"spec": {"taints": [{"key": "c", "effect": "NoSchedule"}, {"key": "c", "value": "2", "effect": "NoSchedule"}]}}),
        ),
        step(
            "a taint value must be a label value",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"spec": {"taints": [{"key": "d", "value": "not a label value", "effect": "NoSchedule"}]}}),
        ),
        step(
            "annotations merge by key; null deletes",
            Method::PATCH,
            &node_path(),
            MERGE,
            json!({"metadata": {"annotations": {"x.example.com/y": "z", fixtures::FOREIGN_ANNOTATION.0: null}}}),
        ),
        step(
            "status in a patch of the node itself is dropped",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"metadata": {"labels": {"l.example.com/m": "n"}}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        step(
            "cordon",
            Method::PATCH,
            &node_path(),
            SMP,
            json!({"spec": {"unschedulable": true}}),
        ),
        step(
            "a missing node",
            Method::GET,
            "/api/v1/nodes/ip-10-9-9-9.ec2.internal",
            JSON,
            Value::Null,
        ),
        step(
            "pods on the node",
            Method::GET,
            &format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}"),
            JSON,
            Value::Null,
        ),
        step(
            "an unsupported field selector",
            Method::GET,
            "/api/v1/pods?fieldSelector=spec.bogus%3Dx",
            JSON,
            Value::Null,
        ),
        step(
            "nodes, one per page",
            Method::GET,
            "/api/v1/nodes?limit=1",
            JSON,
            Value::Null,
        ),
        step(
            "an eviction with grace 0 removes the pod at once",
            Method::POST,
            &evict("free-00000"),
            JSON,
            eviction("free-00000", Some(0)),
        ),
        step(
            "an eviction its budget refuses",
            Method::POST,
            &evict("guarded-00000"),
            JSON,
            eviction("guarded-00000", None),
        ),
        step(
            "an eviction of a missing pod",
            Method::POST,
            &evict("ghost"),
            JSON,
            eviction("ghost", None),
        ),
        step(
            "pods on the node, after",
            Method::GET,
            &format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}"),
            JSON,
            Value::Null,
        ),
        step(
            "an Event about the node, in default",
            Method::POST,
            "/api/v1/namespaces/default/events",
            JSON,
            json!({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": "diff-"},
                "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": NODE},
                "reason": "Differential", "message": "m", "type": "Normal",
                "source": {"component": "nth"},
            }),
        ),
    ]
}

/// What of an answer both backends must agree on.
fn essence(step: &Step, code: u16, body: &Value) -> Value {
    let mut out = json!({"code": code});
    if code >= 400 {
        // The status reason (NotFound, Conflict, Invalid ...) and the fields a 422 names.
        out["reason"] = body["reason"].clone();
        let mut fields: Vec<String> = body["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["field"].as_str().map(str::to_owned))
            .collect();
        fields.sort();
        fields.dedup();
        out["fields"] = json!(fields);
        return out;
    }
    if step.path.contains("/nodes/") {
        out["taints"] = body["spec"]["taints"].clone();
        out["unschedulable"] = body["spec"]["unschedulable"].clone();
        out["ready"] = json!(body["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"));
        let mut annotations = body["metadata"]["annotations"].clone();
        let mut labels = body["metadata"]["labels"].clone();
        for map in [&mut annotations, &mut labels] {
            if let Some(m) = map.as_object_mut() {
                m.retain(|k, _| !k.starts_with("kubectl.kubernetes.io/"));
            }
        }
        out["annotations"] = annotations;
        out["labels"] = labels;
    } else if body["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
        let mut names: Vec<String> = body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        out["names"] = json!(names);
        out["more"] = json!(body["metadata"]["continue"]
            .as_str()
            .is_some_and(|c| !c.is_empty()));
    }
    out
}

async fn seeded(backend: Backend) -> anyhow::Result<Cluster> {
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
        .add_node(fixtures::node(NODE, "i-0000000000000003a", "us-east-1a"))
        .await?;
    cluster
        .add_node(fixtures::node(OTHER, "i-0000000000000004a", "us-east-1a"))
        .await?;
    cluster
        .add_pod(fixtures::replicaset_pod(NS, "free", 0, NODE, "free"))
        .await?;
    cluster
        .add_pod(fixtures::replicaset_pod(NS, "guarded", 0, NODE, "guarded"))
        .await?;
    cluster
        .add_pdb(json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "guarded", "namespace": NS},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
        }))
        .await?;
    Ok(cluster)
}

async fn answers(cluster: &Cluster) -> anyhow::Result<Vec<(String, Value)>> {
    let client = cluster.client(CLUSTER)?;
    let mut out = Vec::new();
    for step in steps() {
        let body = if step.body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&step.body)?
        };
        let request = Request::builder()
            .method(step.method.clone())
            .uri(&step.path)
            .header("content-type", step.content_type)
            .body(body)?;
        let response = client.send(request.map(Into::into)).await?;
        let code = response.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        out.push((step.what.to_owned(), essence(&step, code, &body)));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_answers_as_the_real_server_does() -> anyhow::Result<()> {
    if !Backend::real_available()? {
        eprintln!(
            "skipped: KUBEBUILDER_ASSETS is not set, so there is no real server to compare with"
        );
        return Ok(());
    }
    let real = seeded(Backend::Real).await?;
    let emulated = seeded(Backend::Emulator).await?;
    let from_real = answers(&real).await?;
    let from_emulator = answers(&emulated).await?;

    let differences: Vec<String> = from_real
        .iter()
        .zip(&from_emulator)
        .filter(|(r, e)| r.1 != e.1)
        .map(|((what, r), (_, e))| format!("{what}:\n  real:     {r}\n  emulator: {e}"))
        .collect();
    assert!(
        differences.is_empty(),
        "the emulator differs from the real server:\n{}",
        differences.join("\n")
    );
    // The sequence means something only if the server refused what it should.
    let codes: Vec<u64> = from_real
        .iter()
        .filter_map(|(_, v)| v["code"].as_u64())
        .collect();
    assert_eq!(
        codes,
        [
            200, 200, 422, 409, 422, 422, 422, 200, 200, 200, 404, 200, 400, 200, 201, 429, 404,
            200, 201
        ]
    );
    Ok(())
}

/// What a budget watch shows while a second replica turns up and one is evicted: the
/// successive `disruptionsAllowed` values (repeats folded, since the real disruption
/// controller may write a status more than once).
async fn budget_watch(cluster: &Cluster) -> anyhow::Result<Vec<(String, i64)>> {
    use futures::TryStreamExt;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::api::{ListParams, WatchEvent, WatchParams};
    let client = cluster.client(CLUSTER)?;
    let budgets: kube::Api<PodDisruptionBudget> = kube::Api::all(client.clone());
    // From the budget's first status on: the real disruption controller writes it a moment
    // after the budget is created.
    let mut listed = budgets.list(&ListParams::default()).await?;
    for _ in 0..100 {
        let observed = listed.items.iter().all(|b| {
            b.status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .is_some_and(|g| g >= 1)
        });
        if observed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        listed = budgets.list(&ListParams::default()).await?;
    }
    let first = listed
        .items
        .first()
        .and_then(|b| b.status.as_ref())
        .map_or(-1, |s| i64::from(s.disruptions_allowed));
    let rv = listed.metadata.resource_version.unwrap_or_default();
    let stream = budgets
        .watch(&WatchParams::default().timeout(6), &rv)
        .await?;
    let seen = tokio::spawn(async move {
        let mut seen: Vec<(String, i64)> = Vec::new();
        let mut last = first;
        futures::pin_mut!(stream);
        while let Ok(Some(event)) = stream.try_next().await {
            let (kind, pdb) = match event {
                WatchEvent::Added(p) => ("ADDED", p),
                WatchEvent::Modified(p) => ("MODIFIED", p),
                WatchEvent::Deleted(p) => ("DELETED", p),
                _ => continue,
            };
            let allowed = i64::from(pdb.status.map_or(-1, |s| s.disruptions_allowed));
            if allowed != last {
                seen.push((kind.to_owned(), allowed));
                last = allowed;
            }
        }
        seen
    });
    cluster
        .add_pod(fixtures::replicaset_pod(NS, "guarded", 1, NODE, "guarded"))
        .await?;
    // The real disruption controller writes the budget's status a moment later.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let pod = "guarded-00000";
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("/api/v1/namespaces/{NS}/pods/{pod}/eviction"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&eviction(pod, None))?)?;
    let answer = client.send(request.map(Into::into)).await?;
    anyhow::ensure!(
        answer.status().as_u16() == 201,
        "the eviction was refused: {}",
        answer.status()
    );
    Ok(seen.await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_watch_shows_what_the_disruption_controller_writes() -> anyhow::Result<()> {
    if !Backend::real_available()? {
        eprintln!(
            "skipped: KUBEBUILDER_ASSETS is not set, so there is no real server to compare with"
        );
        return Ok(());
    }
    let from_real = budget_watch(&seeded(Backend::Real).await?).await?;
    let from_emulator = budget_watch(&seeded(Backend::Emulator).await?).await?;

    // A second healthy replica lets one go; the eviction takes that allowance back.
    let expected = [("MODIFIED".to_owned(), 1), ("MODIFIED".to_owned(), 0)];
    assert_eq!(from_real, expected, "the real server");
    assert_eq!(from_emulator, expected, "the emulator");
    Ok(())
}
