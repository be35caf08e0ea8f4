//! The Kubernetes API emulator's own behaviour, checked through real clients: if it were
//! laxer than a real API server, the other tests would prove less.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::Api;
use nth_tests::fixtures;
use nth_tests::kube::{client, AuthConfig, Behaviour, KubeApi};
use serde_json::json;

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
    for taint in [
        json!({"key": "x", "effect": "Sometimes"}),
        json!({"effect": "NoSchedule"}),
    ] {
        let err = nodes
            .patch(
                "n1",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"taints": [taint]}})),
            )
            .await
            .expect_err("rejected");
        // 422 for an invalid effect; a taint without its merge key cannot even be merged.
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 422 || s.code == 400),
            "{err}"
        );
    }
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
