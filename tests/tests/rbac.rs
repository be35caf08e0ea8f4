//! The ClusterRole in deploy/rbac.yaml grants exactly what nth uses: every request the
//! Kubernetes API emulator saw across the function's paths is covered by a rule in
//! deploy/rbac-needs.json (which scripts/check-deploy holds equal to the manifest), and every
//! rule there is used.

use std::collections::BTreeSet;

use nth_tests::fixtures;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{Sandbox, APP_NAMESPACE};
use serde_json::{json, Value};

/// The (resource, verb) a request needs, as the API server's authorizer sees it.
fn permission(method: &str, uri: &str) -> (String, String) {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/v1/<resource>[/<name>] or /api/v1/namespaces/<ns>/<resource>[/<name>[/<sub>]]
    let rest: Vec<&str> = if parts.get(2) == Some(&"namespaces") {
        parts[4..].to_vec()
    } else {
        parts[2..].to_vec()
    };
    let resource = match rest.as_slice() {
        [resource, _, sub] => format!("{resource}/{sub}"),
        [resource, ..] => (*resource).to_owned(),
        [] => String::new(),
    };
    let named = rest.len() >= 2;
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.contains("watch=true") || query.contains("watch=1") => "watch",
        ("GET", false) => "list",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        ("POST", _) => "create",
        _ => "unknown",
    };
    (resource, verb.to_owned())
}

#[test]
fn permissions_are_read_like_the_authorizer_does() {
    assert_eq!(
        permission("GET", "/api/v1/nodes/n1"),
        ("nodes".into(), "get".into())
    );
    assert_eq!(
        permission("GET", "/api/v1/pods?fieldSelector=x&watch=true"),
        ("pods".into(), "watch".into())
    );
    assert_eq!(
        permission("POST", "/api/v1/namespaces/a/pods/p/eviction"),
        ("pods/eviction".into(), "create".into())
    );
    assert_eq!(
        permission("POST", "/api/v1/namespaces/default/events"),
        ("events".into(), "create".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_role_grants_exactly_what_the_function_uses() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    // A finished pod (deleted, not evicted) on the drained node.
    sandbox.emulator().world(|w| {
        let mut done =
            fixtures::replicaset_pod(APP_NAMESPACE, "job-1f2", 0, sandbox.node_name(), "job");
        done["status"] = json!({"phase": "Succeeded"});
        w.add_pod(done);
    });
    let spot = sandbox.invoke(sandbox.spot_event("rbac-1")).await?;
    assert!(matches!(spot, Outcome::Response(_)), "{spot:?}");
    // A node not named after its instance's PrivateDnsName: found by listing nodes.
    let instance = sandbox.managed_instance_without_node().await?;
    sandbox
        .emulator()
        .world(|w| w.add_node(fixtures::node("custom-name-7", &instance.id, "us-east-1a")));
    let ev = nth_tests::sandbox::event(
        "rbac-2",
        "aws.ec2",
        "EC2 Instance Rebalance Recommendation",
        &instance.id,
        json!({"instance-id": instance.id}),
    );
    let rebalance = sandbox.invoke(ev).await?;
    assert!(
        matches!(&rebalance, Outcome::Response(v) if v["results"][0]["node"] == "custom-name-7"),
        "{rebalance:?}"
    );

    let used: BTreeSet<(String, String)> = sandbox
        .emulator()
        .requests()
        .iter()
        .map(|r| permission(&r.method, &r.uri))
        .collect();
    let needs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(
        nth_tests::workspace_root().join("deploy/rbac-needs.json"),
    )?)?;
    let granted: BTreeSet<(String, String)> = needs
        .iter()
        .map(|n| {
            (
                n["resource"].as_str().unwrap_or_default().to_owned(),
                n["verb"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "requests the ClusterRole does not allow: {missing:?}"
    );
    assert!(unused.is_empty(), "rules nothing uses: {unused:?}");
    Ok(())
}
