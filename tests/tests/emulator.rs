//! The Kubernetes API emulator's own behaviour, checked through real clients: if it were
//! laxer than a real API server, the other tests would prove less.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::Api;
use nth_tests::fixtures;
use nth_tests::kube::{client, AuthConfig, Behaviour, KubeApi};
use serde_json::{json, Value};

async fn start() -> anyhow::Result<KubeApi> {
    let api = KubeApi::start(
        AuthConfig {
            cluster_name: "emu".into(),
            secret_access_key: Some(nth_tests::TEST_SECRET_KEY.into()),
        },
        Behaviour::default(),
    )
    .await?;
    api.world(|w| {
        w.add_node(fixtures::node("n1", "i-0000000000000001a", "us-east-1a"));
        w.add_pod(fixtures::replicaset_pod("apps", "web-1", 0, "n1", "web"));
    });
    Ok(api)
}

#[tokio::test]
async fn a_token_signed_for_another_cluster_is_refused() -> anyhow::Result<()> {
    let api = start().await?;
    let stranger = client(&api, "some-other-cluster")?;
    let err = Api::<Node>::all(stranger).get("n1").await.expect_err("401");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 401),
        "{err}"
    );
    assert!(
        api.auth_failures()[0].contains("signature does not match"),
        "{:?}",
        api.auth_failures()
    );
    let ours = client(&api, "emu")?;
    assert!(Api::<Node>::all(ours).get("n1").await.is_ok());
    Ok(())
}

#[tokio::test]
async fn requests_without_a_token_or_with_a_bad_one_are_refused() -> anyhow::Result<()> {
    let api = start().await?;
    let mut config = kube::Config::new(api.url.parse()?);
    config.root_cert = Some(vec![rustls_pki_der(&api.ca_pem)]);
    config.default_retry = false;
    for token in [None, Some("k8s-aws-v1.bm90IGEgdXJs"), Some("just-a-token")] {
        let mut config = config.clone();
        config.auth_info.token = token.map(|t| t.to_owned().into());
        let anonymous = kube::Client::try_from(config)?;
        let err = Api::<Node>::all(anonymous)
            .get("n1")
            .await
            .expect_err("401");
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 401),
            "{token:?}: {err}"
        );
    }
    Ok(())
}

fn rustls_pki_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("the emulator's CA is PEM")
        .to_vec()
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_cluster_ca_cannot_connect() -> anyhow::Result<()> {
    let api = start().await?;
    let other = start().await?;
    let mut config = kube::Config::new(api.url.parse()?);
    config.root_cert = Some(vec![rustls_pki_der(&other.ca_pem)]);
    let client = kube::Client::try_from(config)?;
    let err = Api::<Node>::all(client)
        .get("n1")
        .await
        .expect_err("TLS must fail");
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "never reached the API: {err}"
    );
    assert!(api.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn a_watch_from_a_list_sees_deletion_and_replacement() -> anyhow::Result<()> {
    let api = start().await?;
    api.world(|w| w.behaviour.spare_node = Some("n2".into()));
    let pods: Api<Pod> = Api::all(client(&api, "emu")?);
    let list = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await?;
    let rv = list.metadata.resource_version.clone().unwrap_or_default();
    let key = ("apps".to_owned(), "web-1-00000".to_owned());
    let timers = api.world(|w| w.delete_pod(&key, Some(0), None).map(|(_, t)| t))?;
    api.start_timers(timers);

    let stream = pods
        .watch(
            &WatchParams::default().fields("spec.nodeName=n1").timeout(5),
            &rv,
        )
        .await?;
    let events: Vec<WatchEvent<Pod>> = tokio::time::timeout(
        Duration::from_secs(3),
        stream
            .try_take_while(|e| std::future::ready(Ok(!matches!(e, WatchEvent::Deleted(_)))))
            .try_collect(),
    )
    .await??;
    assert!(
        matches!(events.first(), Some(WatchEvent::Modified(p)) if p.metadata.deletion_timestamp.is_some())
    );
    // The replacement went to n2, so the n1 watch does not report it.
    assert!(events.iter().all(|e| !matches!(e, WatchEvent::Added(_))));
    Ok(())
}

#[tokio::test]
async fn a_patch_carrying_a_stale_resource_version_conflicts() -> anyhow::Result<()> {
    let api = start().await?;
    let nodes: Api<Node> = Api::all(client(&api, "emu")?);
    let node = nodes.get("n1").await?;
    let stale = node.metadata.resource_version.clone().unwrap_or_default();
    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await?;
    let err = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": stale}, "spec": {"unschedulable": true}}),
            ),
        )
        .await
        .expect_err("409");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_taints_are_rejected_like_the_api_server_does() -> anyhow::Result<()> {
    let api = start().await?;
    let nodes: Api<Node> = Api::all(client(&api, "emu")?);
    for (taint, message) in [
        (
            json!({"key": "x", "effect": "Sometimes"}),
            "Node \"n1\" is invalid: metadata.taints[0].effect: Unsupported value: \"Sometimes\": supported values: \"NoSchedule\", \"PreferNoSchedule\", \"NoExecute\"",
        ),
        (
            json!({"key": "x", "effect": "NoSchedule", "value": "has space"}),
            "Node \"n1\" is invalid: metadata.taints[0].value: Invalid value: \"has space\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
        ),
        (
            json!({"effect": "NoSchedule"}),
            "Node \"n1\" is invalid: [metadata.taints[0].key: Invalid value: \"\": name part must be non-empty, metadata.taints[0].key: Invalid value: \"\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')]",
        ),
    ] {
        let err = nodes
            .patch("n1", &PatchParams::default(), &Patch::Strategic(json!({"spec": {"taints": [taint]}})))
            .await
            .expect_err("rejected");
        assert_eq!(refusal(err), (422, message.to_owned()));
    }
    // Unique by key and effect: the same key with two effects is fine, twice the same is not.
    let two = json!({"spec": {"taints": [{"key": "x", "effect": "NoSchedule"}, {"key": "x", "effect": "NoExecute"}]}});
    nodes
        .patch("n1", &PatchParams::default(), &Patch::Strategic(two))
        .await?;
    let twice = json!({"spec": {"taints": [{"key": "x", "effect": "NoSchedule", "value": "1"}, {"key": "x", "effect": "NoSchedule", "value": "2"}]}});
    let err = nodes
        .patch("n1", &PatchParams::default(), &Patch::Strategic(twice))
        .await
        .expect_err("duplicate");
    assert_eq!(
        refusal(err),
        (422, "Node \"n1\" is invalid: metadata.taints[1]: Duplicate value: core.Taint{Key:\"x\", Value:\"2\", Effect:\"NoSchedule\", TimeAdded:<nil>}: taints must be unique by key and effect pair".to_owned())
    );
    Ok(())
}

#[tokio::test]
async fn label_and_annotation_keys_and_types_are_checked() -> anyhow::Result<()> {
    let api = start().await?;
    let nodes: Api<Node> = Api::all(client(&api, "emu")?);
    let name_part = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
    for (patch, message) in [
        (
            json!({"metadata": {"labels": {"bad key": "v"}}}),
            format!("Node \"n1\" is invalid: metadata.labels: Invalid value: \"bad key\": {name_part}"),
        ),
        (
            json!({"metadata": {"annotations": {"bad key": "v"}}}),
            format!("Node \"n1\" is invalid: metadata.annotations: Invalid value: \"bad key\": {name_part}"),
        ),
    ] {
        let err = nodes
            .patch("n1", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect_err("422");
        assert_eq!(refusal(err), (422, message));
    }
    // A value of the wrong type fails decoding: 422 about the patch, not a 400.
    for patch in [
        json!({"metadata": {"annotations": {"k": 1}}}),
        json!({"spec": {"unschedulable": "yes"}}),
    ] {
        let err = nodes
            .patch("n1", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect_err("422");
        let (code, message) = refusal(err);
        assert_eq!(code, 422);
        assert!(
            message.contains("is invalid: patch: Invalid value"),
            "{message}"
        );
    }
    // providerID is set once.
    let err = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"providerID": "aws:///us-east-1a/i-0other"}})),
        )
        .await
        .expect_err("422");
    assert_eq!(
        refusal(err),
        (422, "Node \"n1\" is invalid: spec.providerID: Forbidden: node updates may not change providerID except from \"\" to valid".to_owned())
    );
    Ok(())
}

/// The code and message of an API refusal.
fn refusal(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.message.clone()),
        other => panic!("not an API refusal: {other}"),
    }
}

/// A raw request through the emulator's client, for verbs and bodies typed clients do not send.
async fn raw(
    client: &kube::Client,
    method: &str,
    uri: &str,
    content_type: &str,
    body: &Value,
) -> Result<Value, kube::Error> {
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(serde_json::to_vec(body).expect("JSON"))
        .expect("a request");
    client.request::<Value>(request).await
}

const SMP: &str = "application/strategic-merge-patch+json";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

fn taints(node: &Value) -> Value {
    node["spec"]["taints"].clone()
}

#[tokio::test]
async fn node_taints_are_an_atomic_list() -> anyhow::Result<()> {
    let api = start().await?;
    let client = client(&api, "emu")?;
    let foreign =
        json!({"key": "team.example.com/dedicated", "value": "db", "effect": "NoSchedule"});
    let nth = json!({"key": "nth/interruption", "value": "x", "effect": "NoSchedule"});
    raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        MERGE,
        &json!({"spec": {"taints": [foreign]}}),
    )
    .await?;
    // A strategic-merge patch naming taints replaces the whole list: the foreign taint goes.
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"spec": {"taints": [nth]}}),
    )
    .await?;
    assert_eq!(taints(&node), json!([nth]));
    // `$patch: delete` is no directive in an atomic list: a taint without an effect.
    let err = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"spec": {"taints": [{"key": "nth/interruption", "$patch": "delete"}]}}),
    )
    .await
    .expect_err("422");
    assert_eq!(
        refusal(err),
        (
            422,
            "Node \"n1\" is invalid: metadata.taints[0].effect: Required value".to_owned()
        )
    );
    assert_eq!(taints(&api.node("n1").expect("n1")), json!([nth]));
    // With key and effect it is data: the `$patch` field is dropped, the taint stays.
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"spec": {"taints": [{"key": "z", "effect": "NoSchedule", "$patch": "delete"}]}}),
    )
    .await?;
    assert_eq!(taints(&node), json!([{"key": "z", "effect": "NoSchedule"}]));
    // A merge patch replaces lists too; null or an empty list removes them.
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        MERGE,
        &json!({"spec": {"taints": [nth]}}),
    )
    .await?;
    assert_eq!(taints(&node), json!([nth]));
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"spec": {"taints": []}}),
    )
    .await?;
    assert_eq!(node["spec"].get("taints"), None);
    // Into a node without taints, directive elements are dropped (a no-op here).
    let before = api.node("n1").expect("n1")["metadata"]["resourceVersion"].clone();
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"spec": {"taints": [{"key": "nth/interruption", "$patch": "delete"}]}}),
    )
    .await?;
    assert_eq!(node["spec"].get("taints"), None);
    assert_eq!(node["metadata"]["resourceVersion"], before);
    Ok(())
}

#[tokio::test]
async fn pod_lists_merge_by_their_schema_keys() -> anyhow::Result<()> {
    let api = start().await?;
    let client = client(&api, "emu")?;
    let pod = "/api/v1/namespaces/apps/pods/web-1-00000";
    api.world(|w| {
        let key = ("apps".to_owned(), "web-1-00000".to_owned());
        if let Some(p) = w.pods.get_mut(&key) {
            p["spec"]["containers"] =
                json!([{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]);
        }
    });
    // containers merge by name: only b's image changes.
    let patched = raw(
        &client,
        "PATCH",
        pod,
        SMP,
        &json!({"spec": {"containers": [{"name": "b", "image": "b:2"}]}}),
    )
    .await?;
    assert_eq!(
        patched["spec"]["containers"],
        json!([{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:2"}])
    );
    // An item without its merge key cannot be merged: the real server answers 500.
    let err = raw(
        &client,
        "PATCH",
        pod,
        SMP,
        &json!({"spec": {"containers": [{"image": "b:3"}]}}),
    )
    .await
    .expect_err("500");
    assert_eq!(
        refusal(err),
        (
            500,
            "map: map[image:b:3] does not contain declared merge key: name".to_owned()
        )
    );
    // Adding or removing containers is not an update a pod takes.
    let err = raw(
        &client,
        "PATCH",
        pod,
        MERGE,
        &json!({"spec": {"containers": [{"name": "b", "image": "b:3"}]}}),
    )
    .await
    .expect_err("422");
    assert_eq!(
        refusal(err),
        (422, "Pod \"web-1-00000\" is invalid: spec.containers: Forbidden: pod updates may not add or remove containers".to_owned())
    );
    // ownerReferences merge by uid, a new one first.
    let extra = json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "cm", "uid": "22222222-2222-2222-2222-222222222222"});
    let patched = raw(
        &client,
        "PATCH",
        pod,
        SMP,
        &json!({"metadata": {"ownerReferences": [extra]}}),
    )
    .await?;
    let owners = patched["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(owners.len(), 2);
    assert_eq!(owners[0], extra);
    // Status conditions merge by type, through the status subresource.
    let patched = raw(
        &client,
        "PATCH",
        &format!("{pod}/status"),
        SMP,
        &json!({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}}),
    )
    .await?;
    assert_eq!(
        patched["status"]["conditions"],
        json!([{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}])
    );
    Ok(())
}

#[tokio::test]
async fn node_status_conditions_and_addresses_merge_by_type() -> anyhow::Result<()> {
    let api = start().await?;
    let client = client(&api, "emu")?;
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1/status",
        SMP,
        &json!({"status": {
            "conditions": [{"type": "MemoryPressure", "status": "False"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
        }, "spec": {"unschedulable": true}}),
    )
    .await?;
    assert_eq!(
        node["status"]["conditions"],
        json!([{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}])
    );
    assert_eq!(
        node["status"]["addresses"],
        json!([{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "InternalDNS", "address": "n1"}])
    );
    // The status subresource does not write the spec.
    assert_eq!(node["spec"].get("unschedulable"), None);
    // The node itself does not write the status.
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}, "metadata": {"labels": {"st": "1"}}}),
    )
    .await?;
    assert_eq!(node["metadata"]["labels"]["st"], "1");
    assert_eq!(
        node["status"]["conditions"][1],
        json!({"type": "Ready", "status": "True"})
    );
    let read = raw(
        &client,
        "GET",
        "/api/v1/nodes/n1/status",
        "application/json",
        &json!(null),
    )
    .await;
    assert!(read.is_ok_and(|n| n["metadata"]["name"] == "n1"));
    Ok(())
}

#[tokio::test]
async fn a_pods_status_is_written_only_through_its_status_subresource() -> anyhow::Result<()> {
    let api = start().await?;
    let pods: Api<Pod> = Api::namespaced(client(&api, "emu")?, "apps");
    let before = pods.get("web-1-00000").await?;
    let patched = pods
        .patch(
            "web-1-00000",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"metadata": {"labels": {"x": "1"}}, "status": {"phase": "Failed"}}),
            ),
        )
        .await?;
    assert_eq!(patched.status, before.status);
    assert_eq!(patched.metadata.labels.unwrap_or_default()["x"], "1");
    // Status only: nothing changes, so the version stays.
    let unchanged = pods
        .patch(
            "web-1-00000",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await?;
    assert_eq!(
        unchanged.metadata.resource_version,
        patched.metadata.resource_version
    );
    let written = pods
        .patch_status(
            "web-1-00000",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Failed"}, "spec": {"nodeName": "elsewhere"}}),
            ),
        )
        .await?;
    assert_eq!(
        written.status.and_then(|s| s.phase).as_deref(),
        Some("Failed")
    );
    assert_eq!(
        written.spec.and_then(|s| s.node_name).as_deref(),
        Some("n1")
    );
    // The pod's spec takes only the few updates a pod takes.
    let err = pods
        .patch(
            "web-1-00000",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n2"}})),
        )
        .await
        .expect_err("422");
    let (code, message) = refusal(err);
    assert_eq!(code, 422);
    assert!(message.starts_with("Pod \"web-1-00000\" is invalid: spec: Forbidden: pod updates may not change fields other than"), "{message}");
    Ok(())
}

const MODIFIED: &str = "Operation cannot be fulfilled on nodes \"n1\": the object has been modified; please apply your changes to the latest version and try again";

#[tokio::test]
async fn every_write_with_a_stale_resource_version_conflicts() -> anyhow::Result<()> {
    let api = start().await?;
    let client = client(&api, "emu")?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get("n1").await?;
    let current = node.metadata.resource_version.clone().unwrap_or_default();
    let stale = (current.parse::<u64>()? - 1).to_string();
    for (method, content_type, body) in [
        (
            "PATCH",
            SMP,
            json!({"metadata": {"resourceVersion": stale}, "spec": {"unschedulable": true}}),
        ),
        (
            "PATCH",
            MERGE,
            json!({"metadata": {"resourceVersion": stale}, "spec": {"unschedulable": true}}),
        ),
        (
            "PATCH",
            JSON_PATCH,
            json!([{"op": "replace", "path": "/metadata/resourceVersion", "value": stale}, {"op": "add", "path": "/spec/unschedulable", "value": true}]),
        ),
        ("PUT", "application/json", {
            let mut n = serde_json::to_value(&node)?;
            n["metadata"]["resourceVersion"] = json!(stale);
            n
        }),
        (
            "PATCH",
            SMP,
            json!({"metadata": {"resourceVersion": stale}, "status": {"phase": "Running"}}),
        ),
    ] {
        let uri = if body.pointer("/status").is_some() {
            "/api/v1/nodes/n1/status"
        } else {
            "/api/v1/nodes/n1"
        };
        let err = raw(&client, method, uri, content_type, &body)
            .await
            .expect_err("409");
        assert_eq!(
            refusal(err),
            (409, MODIFIED.to_owned()),
            "{method} {content_type}"
        );
    }
    assert_eq!(
        api.node("n1").expect("n1")["metadata"]["resourceVersion"],
        json!(current)
    );
    // The current version applies, and the write moves the version on.
    let patched = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"metadata": {"resourceVersion": current}, "spec": {"unschedulable": true}}),
    )
    .await?;
    let after = patched["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(after.parse::<u64>()? > current.parse::<u64>()?);
    // Without a version a write always applies; one that changes nothing keeps the version.
    let same = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        SMP,
        &json!({"spec": {"unschedulable": true}}),
    )
    .await?;
    assert_eq!(same["metadata"]["resourceVersion"], json!(after));
    // A PUT with the current version replaces labels and spec, and keeps the status.
    let mut whole = api.node("n1").expect("n1");
    whole["metadata"]["labels"] = json!({"only": "this"});
    whole["status"] = json!({});
    let put = raw(
        &client,
        "PUT",
        "/api/v1/nodes/n1",
        "application/json",
        &whole,
    )
    .await?;
    assert_eq!(put["metadata"]["labels"], json!({"only": "this"}));
    assert_eq!(
        put["status"]["conditions"],
        json!([{"type": "Ready", "status": "True"}])
    );
    whole["metadata"]["name"] = json!("n9");
    let err = raw(
        &client,
        "PUT",
        "/api/v1/nodes/n1",
        "application/json",
        &whole,
    )
    .await
    .expect_err("400");
    assert_eq!(
        refusal(err),
        (
            400,
            "the name of the object (n9) does not match the name on the URL (n1)".to_owned()
        )
    );
    Ok(())
}

#[tokio::test]
async fn a_json_patch_test_that_fails_refuses_the_whole_patch() -> anyhow::Result<()> {
    let api = start().await?;
    let client = client(&api, "emu")?;
    let err = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        JSON_PATCH,
        &json!([{"op": "add", "path": "/metadata/labels/x", "value": "y"},
                {"op": "test", "path": "/spec/unschedulable", "value": true}]),
    )
    .await
    .expect_err("422");
    assert_eq!(
        refusal(err),
        (
            422,
            "the server rejected our request due to an error in our request".to_owned()
        )
    );
    assert_eq!(
        api.node("n1").expect("n1")["metadata"]["labels"].get("x"),
        None
    );
    let node = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        JSON_PATCH,
        &json!([{"op": "test", "path": "/metadata/name", "value": "n1"},
                {"op": "add", "path": "/spec/taints", "value": [{"key": "a", "effect": "NoSchedule"}]},
                {"op": "add", "path": "/spec/taints/-", "value": {"key": "b", "effect": "NoSchedule"}}]),
    )
    .await?;
    assert_eq!(
        taints(&node),
        json!([{"key": "a", "effect": "NoSchedule"}, {"key": "b", "effect": "NoSchedule"}])
    );
    let err = raw(
        &client,
        "PATCH",
        "/api/v1/nodes/n1",
        "application/json",
        &json!({}),
    )
    .await
    .expect_err("415");
    assert_eq!(refusal(err).0, 415);
    Ok(())
}

fn eviction(name: &str, delete_options: Value) -> Value {
    json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": name, "namespace": "apps"},
        "deleteOptions": delete_options,
    })
}

#[tokio::test]
async fn an_eviction_without_grace_removes_the_pod_at_once() -> anyhow::Result<()> {
    let api = start().await?;
    let client = client(&api, "emu")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let rv = pods
        .get("web-1-00000")
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let answer = raw(
        &client,
        "POST",
        "/api/v1/namespaces/apps/pods/web-1-00000/eviction",
        "application/json",
        &eviction("web-1-00000", json!({"gracePeriodSeconds": 0})),
    )
    .await?;
    assert_eq!(
        (answer["status"].as_str(), answer["code"].as_u64()),
        (Some("Success"), Some(201))
    );
    // No kubelet to wait for: gone in the same request.
    let err = pods.get("web-1-00000").await.expect_err("404");
    assert_eq!(
        refusal(err),
        (404, "pods \"web-1-00000\" not found".to_owned())
    );
    let stream = pods
        .watch(
            &WatchParams::default()
                .fields("metadata.name=web-1-00000")
                .timeout(2),
            &rv,
        )
        .await?;
    let events: Vec<WatchEvent<Pod>> =
        tokio::time::timeout(Duration::from_secs(3), stream.try_collect()).await??;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        })
        .collect();
    assert_eq!(kinds, ["MODIFIED", "DELETED"]);
    Ok(())
}

#[tokio::test]
async fn an_eviction_with_grace_leaves_the_pod_terminating() -> anyhow::Result<()> {
    let api = start().await?;
    // A kubelet that never stops the containers: only the API decides.
    api.world(|w| w.behaviour.pod_stop_delay = Duration::from_secs(3600));
    let client = client(&api, "emu")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let evict = |grace: i64| {
        let (client, body) = (
            client.clone(),
            eviction("web-1-00000", json!({"gracePeriodSeconds": grace})),
        );
        async move {
            let uri = "/api/v1/namespaces/apps/pods/web-1-00000/eviction";
            raw(&client, "POST", uri, "application/json", &body).await
        }
    };
    evict(30).await?;
    let pod = pods.get("web-1-00000").await?;
    assert!(pod.metadata.deletion_timestamp.is_some());
    assert_eq!(pod.metadata.deletion_grace_period_seconds, Some(30));
    // Again, longer: nothing changes. Shorter: the grace shortens. Zero: gone.
    evict(60).await?;
    assert_eq!(
        pods.get("web-1-00000")
            .await?
            .metadata
            .deletion_grace_period_seconds,
        Some(30)
    );
    evict(5).await?;
    assert_eq!(
        pods.get("web-1-00000")
            .await?
            .metadata
            .deletion_grace_period_seconds,
        Some(5)
    );
    evict(0).await?;
    assert_eq!(
        refusal(pods.get("web-1-00000").await.expect_err("404")).0,
        404
    );
    Ok(())
}

#[tokio::test]
async fn evictions_answer_as_the_real_server_does() -> anyhow::Result<()> {
    let api = start().await?;
    api.world(|w| {
        w.add_pdb(json!({"metadata": {"name": "web", "namespace": "apps"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}}));
    });
    let client = client(&api, "emu")?;
    let post = |name: &str, options: Value| {
        let (client, body) = (client.clone(), eviction(name, options));
        let uri = format!("/api/v1/namespaces/apps/pods/{name}/eviction");
        async move { raw(&client, "POST", &uri, "application/json", &body).await }
    };
    let err = post("web-1-00000", json!({})).await.expect_err("429");
    assert_eq!(
        refusal(err),
        (
            429,
            "Cannot evict pod as it would violate the pod's disruption budget.".to_owned()
        )
    );
    let err = post("nope", json!({})).await.expect_err("404");
    assert_eq!(refusal(err), (404, "pods \"nope\" not found".to_owned()));
    api.world(|w| w.pdbs.clear());
    let err = post(
        "web-1-00000",
        json!({"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}}),
    )
    .await
    .expect_err("409");
    let (code, message) = refusal(err);
    assert_eq!(code, 409);
    assert!(
        message.starts_with("Operation cannot be fulfilled on Pod \"web-1-00000\": the UID in the precondition (00000000-0000-0000-0000-000000000000) does not match the UID in record ("),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn node_lists_page_by_key_and_report_what_remains() -> anyhow::Result<()> {
    let api = start().await?;
    api.world(|w| {
        for (name, id) in [("n2", "i-0000000000000002b"), ("n3", "i-0000000000000003c")] {
            w.add_node(fixtures::node(name, id, "us-east-1a"));
        }
    });
    let nodes: Api<Node> = Api::all(client(&api, "emu")?);
    let first = nodes.list(&ListParams::default().limit(1)).await?;
    assert_eq!(first.items[0].metadata.name.as_deref(), Some("n1"));
    assert_eq!(first.metadata.remaining_item_count, Some(2));
    let token = first.metadata.continue_.clone().expect("more pages");
    // A listed node going between pages does not make the next page skip one.
    api.world(|w| w.nodes.remove("n1"));
    let second = nodes
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await?;
    assert_eq!(second.items[0].metadata.name.as_deref(), Some("n2"));
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    // With a selector the server does not count what remains.
    let selected = nodes
        .list(
            &ListParams::default()
                .limit(1)
                .labels("topology.kubernetes.io/zone=us-east-1a"),
        )
        .await?;
    assert_eq!(selected.metadata.remaining_item_count, None);
    assert!(selected.metadata.continue_.is_some());
    let err = nodes
        .list(&ListParams::default().limit(1).continue_token("garbage"))
        .await
        .expect_err("400");
    assert_eq!(refusal(err).0, 400);
    Ok(())
}

#[tokio::test]
async fn pods_are_selected_by_node_and_unknown_fields_refused() -> anyhow::Result<()> {
    let api = start().await?;
    api.world(|w| w.add_pod(fixtures::replicaset_pod("apps", "web-2", 0, "n2", "web")));
    let pods: Api<Pod> = Api::all(client(&api, "emu")?);
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await?;
    assert_eq!(on_n1.items.len(), 1);
    let err = pods
        .list(&ListParams::default().fields("spec.bogus=n1"))
        .await
        .expect_err("400");
    assert_eq!(
        refusal(err),
        (400, "field label not supported: spec.bogus".to_owned())
    );
    Ok(())
}

#[tokio::test]
async fn a_watch_from_a_version_out_of_history_ends_with_a_410_event() -> anyhow::Result<()> {
    let api = start().await?;
    api.world(|w| {
        for i in 0..20_001 {
            w.add_pod(fixtures::replicaset_pod("bulk", "churn", i, "n9", "churn"));
        }
    });
    let pods: Api<Pod> = Api::all(client(&api, "emu")?);
    let stream = pods.watch(&WatchParams::default().timeout(2), "1").await?;
    let events: Vec<WatchEvent<Pod>> =
        tokio::time::timeout(Duration::from_secs(3), stream.try_collect()).await??;
    assert!(
        matches!(events.as_slice(), [WatchEvent::Error(e)] if e.code == 410 && e.message.starts_with("too old resource version: 1 (")),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_event_about_a_node_belongs_in_default() -> anyhow::Result<()> {
    let api = start().await?;
    let events: Api<Event> = Api::namespaced(client(&api, "emu")?, "apps");
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": "n1.1"},
        "involvedObject": {"kind": "Node", "name": "n1"},
        "reason": "Test", "message": "hello", "type": "Normal",
    }))?;
    let err = events
        .create(&PostParams::default(), &event)
        .await
        .expect_err("422");
    assert_eq!(
        refusal(err),
        (422, "Event \"n1.1\" is invalid: involvedObject.namespace: Invalid value: \"\": does not match event.namespace".to_owned())
    );
    Ok(())
}

#[tokio::test]
async fn events_are_created_with_generated_names_and_listed_by_object() -> anyhow::Result<()> {
    let api = start().await?;
    let events: Api<Event> = Api::namespaced(client(&api, "emu")?, "default");
    let event: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "n1."},
        "involvedObject": {"kind": "Node", "name": "n1"},
        "reason": "Test", "message": "hello", "type": "Normal",
    }))?;
    let created = events.create(&PostParams::default(), &event).await?;
    assert!(created.metadata.name.is_some_and(|n| n.starts_with("n1.")));
    let found = events
        .list(&ListParams::default().fields("involvedObject.name=n1"))
        .await?;
    assert_eq!(found.items.len(), 1);
    let bad: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "n1."}, "involvedObject": {"kind": "Node", "name": "n1"},
        "reason": "Test", "type": "Loud",
    }))?;
    assert!(events.create(&PostParams::default(), &bad).await.is_err());
    Ok(())
}

#[tokio::test]
async fn an_eviction_body_with_the_wrong_field_name_is_refused() -> anyhow::Result<()> {
    let api = start().await?;
    let client = client(&api, "emu")?;
    let body = json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": "web-1-00000", "namespace": "apps"},
        "delete_options": {"gracePeriodSeconds": 0},
    });
    let request = http::Request::post("/api/v1/namespaces/apps/pods/web-1-00000/eviction")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body)?)?;
    let err = client.request_text(request).await.expect_err("400");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 400 && s.message.contains("delete_options")),
        "{err}"
    );
    let log = api.requests();
    let last = log.last().expect("logged");
    assert_eq!((last.method.as_str(), last.status), ("POST", 400));
    Ok(())
}
