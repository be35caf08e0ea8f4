//! The ClusterRole in deploy/rbac.yaml grants exactly what nth uses. On the emulator: every
//! request it saw across the function's paths is covered by a rule in deploy/rbac-needs.json
//! (which scripts/check-deploy holds equal to the manifest), and every rule there is used. On
//! the real control plane, where the manifest is applied and the real RBAC authorizer judges
//! the function's EKS identity: the same paths meet no 403, and without one of the rules the
//! drain fails with the 403 named, as an operator would see it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nth_tests::cluster::Backend;
use nth_tests::envtest::{ControlPlane, EKS_GROUP, EKS_USERNAME};
use nth_tests::fixtures;
use nth_tests::on_both_backends;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{sandbox_behaviour, Sandbox, APP_NAMESPACE};
use serde_json::{json, Value};

/// The function's ClusterRole, as deploy/rbac.yaml names it.
const ROLE: &str = "nth-node-termination-handler";
/// How long the authorizer may take to see a change of the role (its informer's lag).
const RBAC_PATIENCE: Duration = Duration::from_secs(30);

/// The (resource, verb) a request needs, as the API server's authorizer sees it.
fn permission(method: &str, uri: &str) -> (String, String) {
    let (_, resource, verb) = scoped_permission(method, uri);
    (resource, verb)
}

/// The (namespace, resource, verb) a request needs; the namespace is empty for a
/// cluster-scoped request (or one across all namespaces).
fn scoped_permission(method: &str, uri: &str) -> (String, String, String) {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/v1/<resource>[/<name>] or /api/v1/namespaces/<ns>/<resource>[/<name>[/<sub>]];
    // /apis/<group>/<version>/... alike.
    let base = if parts.first() == Some(&"apis") { 3 } else { 2 };
    let (namespace, rest): (&str, Vec<&str>) =
        if parts.get(base) == Some(&"namespaces") && parts.len() > base + 2 {
            (parts[base + 1], parts[base + 2..].to_vec())
        } else {
            ("", parts.get(base..).unwrap_or_default().to_vec())
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
    (namespace.to_owned(), resource, verb.to_owned())
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
    assert_eq!(
        permission(
            "GET",
            "/apis/policy/v1/poddisruptionbudgets?watch=true&resourceVersion=5"
        ),
        ("poddisruptionbudgets".into(), "watch".into())
    );
    assert_eq!(
        scoped_permission("POST", "/api/v1/namespaces/default/events"),
        ("default".into(), "events".into(), "create".into())
    );
    assert_eq!(
        scoped_permission("PATCH", "/api/v1/nodes/n1"),
        (String::new(), "nodes".into(), "patch".into())
    );
}

on_both_backends! {
    async fn the_cluster_role_grants_exactly_what_the_function_uses(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        // A finished pod (deleted, not evicted) on the drained node.
        let mut done =
            fixtures::replicaset_pod(APP_NAMESPACE, "job-1f2", 0, sandbox.node_name(), "job");
        done["status"] = json!({"phase": "Succeeded"});
        sandbox.kube.add_pod(done).await?;
        let spot = sandbox.invoke(sandbox.spot_event("rbac-1")).await?;
        assert_eq!(spot.summary(), "drained", "{spot:?}");
        // A node not named after its instance's PrivateDnsName: found by listing nodes.
        let instance = sandbox.managed_instance_without_node().await?;
        sandbox
            .kube
            .add_node(fixtures::node("custom-name-7", &instance.id, "us-east-1a"))
            .await?;
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
        let marked = sandbox.kube.node("custom-name-7").await?.expect("node");
        assert!(
            fixtures::our_taint_keys(&marked, "node-termination-handler")
                .contains(&"node-termination-handler/rebalance-recommendation".to_owned()),
            "{marked:#}"
        );

        // No request was refused: not in the results, not in the log.
        for (what, text) in [
            ("the spot result", format!("{spot:?}")),
            ("the rebalance result", format!("{rebalance:?}")),
            ("the function's log", sandbox.lambda.output().join("\n")),
        ] {
            // The API server words every 403 as "... is forbidden: User ... cannot ...".
            assert!(
                !text.to_lowercase().contains("forbidden"),
                "{what} shows a refused request:\n{text}"
            );
        }

        let Some(emu) = sandbox.kube.emulator() else {
            return Ok(());
        };
        let used: BTreeSet<(String, String, String)> = emu
            .requests()
            .iter()
            .map(|r| scoped_permission(&r.method, &r.uri))
            .collect();
        let needs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(
            nth_tests::workspace_root().join("deploy/rbac-needs.json"),
        )?)?;
        // A need with a namespace is granted by a Role there only; without, cluster-wide.
        let granted: BTreeSet<(String, String, String)> = needs
            .iter()
            .map(|n| {
                (
                    n["namespace"].as_str().unwrap_or_default().to_owned(),
                    n["resource"].as_str().unwrap_or_default().to_owned(),
                    n["verb"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let covers = |g: &(String, String, String), u: &(String, String, String)| {
            (g.0.is_empty() || g.0 == u.0) && g.1 == u.1 && g.2 == u.2
        };
        let missing: Vec<_> = used
            .iter()
            .filter(|u| !granted.iter().any(|g| covers(g, u)))
            .collect();
        let unused: Vec<_> = granted
            .iter()
            .filter(|g| !used.iter().any(|u| covers(g, u)))
            .collect();
        assert!(
            missing.is_empty(),
            "requests the ClusterRole does not allow: {missing:?}"
        );
        assert!(unused.is_empty(), "rules nothing uses: {unused:?}");
        Ok(())
    }
}

/// Whether the function's EKS identity may `verb` `resource` in the app's namespace, as the
/// real authorizer answers now.
fn function_can(plane: &ControlPlane, verb: &str, resource: &str) -> anyhow::Result<bool> {
    function_can_in(plane, APP_NAMESPACE, verb, resource)
}

/// Whether the function's EKS identity may `verb` `resource` in `namespace`, as the real
/// authorizer answers now.
fn function_can_in(
    plane: &ControlPlane,
    namespace: &str,
    verb: &str,
    resource: &str,
) -> anyhow::Result<bool> {
    // `pods/eviction` would be read as the pod named `eviction`.
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let output = plane.kubectl(&[
        "auth",
        "can-i",
        verb,
        resource,
        &format!("--subresource={subresource}"),
        "--namespace",
        namespace,
        "--as",
        EKS_USERNAME,
        "--as-group",
        EKS_GROUP,
    ])?;
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => anyhow::bail!(
            "kubectl auth can-i answered {other:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Polls until the authorizer's answer about `verb` `resource` is `wanted`.
fn wait_until_function_can(
    plane: &ControlPlane,
    verb: &str,
    resource: &str,
    wanted: bool,
) -> anyhow::Result<()> {
    let began = Instant::now();
    while function_can(plane, verb, resource)? != wanted {
        anyhow::ensure!(
            began.elapsed() < RBAC_PATIENCE,
            "the authorizer never answered {wanted} for {verb} {resource}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// One rule taken out of the function's ClusterRole for as long as it lives; dropping it
/// applies the shipped manifests again, whatever the test did meanwhile. The lease's wipe
/// leaves RBAC objects alone, so without this the next test of the binary would inherit the
/// edit. Take it while holding the lease (a sandbox on the real backend), and drop it first.
struct RuleRemoved {
    plane: &'static ControlPlane,
    verb: &'static str,
    resource: &'static str,
}

impl RuleRemoved {
    fn take(
        plane: &'static ControlPlane,
        verb: &'static str,
        resource: &'static str,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            function_can(plane, verb, resource)?,
            "the shipped role does not grant {verb} {resource} to begin with"
        );
        // The guard first: a failure from here on still restores the role.
        let guard = Self {
            plane,
            verb,
            resource,
        };
        let output = plane.kubectl(&["get", "clusterrole", ROLE, "-o", "json"])?;
        anyhow::ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let role: Value = serde_json::from_slice(&output.stdout)?;
        let rules = role["rules"].as_array().cloned().unwrap_or_default();
        let index = rules
            .iter()
            .position(|r| r["resources"] == json!([resource]) && r["verbs"] == json!([verb]))
            .ok_or_else(|| anyhow::anyhow!("no rule {verb} {resource} alone in {rules:?}"))?;
        let patch = json!([
            {"op": "test", "path": format!("/rules/{index}"), "value": rules[index]},
            {"op": "remove", "path": format!("/rules/{index}")},
        ]);
        let output = plane.kubectl(&[
            "patch",
            "clusterrole",
            ROLE,
            "--type=json",
            "-p",
            &patch.to_string(),
        ])?;
        anyhow::ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        wait_until_function_can(plane, verb, resource, false)?;
        Ok(guard)
    }
}

impl Drop for RuleRemoved {
    fn drop(&mut self) {
        let restored = self
            .plane
            .reapply_rbac()
            .and_then(|()| wait_until_function_can(self.plane, self.verb, self.resource, true));
        if let Err(error) = restored {
            // Not a panic: this may run while the test unwinds. The next tests will fail
            // with 403s, and this line says why.
            eprintln!("restoring the ClusterRole {ROLE} failed: {error:#}");
        }
    }
}

// Real backend only: the emulator has no RBAC authorizer to take a rule away from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_eviction_rule_the_drain_fails_naming_the_403() -> anyhow::Result<()> {
    if !Backend::real_available()? {
        eprintln!("skipped: KUBEBUILDER_ASSETS is not set, so there is no real control plane");
        return Ok(());
    }
    let sandbox = Sandbox::start_on(Backend::Real, &[], sandbox_behaviour()).await?;
    let plane = sandbox.kube.real().expect("the real backend").plane();
    let removed =
        tokio::task::block_in_place(|| RuleRemoved::take(plane, "create", "pods/eviction"))?;

    let outcome = sandbox
        .invoke(sandbox.spot_event("rbac-no-eviction"))
        .await?;

    let restored = tokio::task::block_in_place(|| {
        drop(removed);
        function_can(plane, "create", "pods/eviction")
    })?;
    assert!(
        restored,
        "the ClusterRole is as shipped again for the next tests"
    );
    let told = format!("{outcome:?}");
    assert_ne!(outcome.summary(), "drained", "{told}");
    assert!(
        told.contains("forbidden") && told.contains("pods/eviction"),
        "the operator is told the eviction was forbidden: {told}"
    );
    // The node was still marked (nodes patch is granted), and no workload pod was evicted.
    let node = sandbox.kube.node(sandbox.node_name()).await?.expect("node");
    assert_eq!(node["spec"]["unschedulable"], true);
    fixtures::foreign_marks_kept(&node).map_err(anyhow::Error::msg)?;
    assert_eq!(sandbox.kube.pods_on(sandbox.node_name()).await?.len(), 10);
    Ok(())
}

// Real backend only: the shipped manifest, judged by the real RBAC authorizer. Events are
// posted in `default` only, so that is the one namespace the function may create them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_may_be_created_in_default_only() -> anyhow::Result<()> {
    if !Backend::real_available()? {
        eprintln!("skipped: KUBEBUILDER_ASSETS is not set, so there is no real control plane");
        return Ok(());
    }
    let sandbox = Sandbox::start_on(Backend::Real, &[], sandbox_behaviour()).await?;
    let plane = sandbox.kube.real().expect("the real backend").plane();
    let (in_default, in_app) = tokio::task::block_in_place(|| {
        anyhow::Ok((
            function_can_in(plane, "default", "create", "events")?,
            function_can_in(plane, APP_NAMESPACE, "create", "events")?,
        ))
    })?;
    assert!(in_default, "the function may post Events in default");
    assert!(
        !in_app,
        "the function may not post Events in {APP_NAMESPACE} (no cluster-wide events rule)"
    );
    // And the function's own Events still arrive: a drain posts them in default.
    let spot = sandbox.invoke(sandbox.spot_event("rbac-events")).await?;
    assert_eq!(spot.summary(), "drained", "{spot:?}");
    assert!(
        !format!("{spot:?}").to_lowercase().contains("forbidden")
            && !sandbox
                .lambda
                .output()
                .join("\n")
                .to_lowercase()
                .contains("forbidden"),
        "no request was refused"
    );
    Ok(())
}
