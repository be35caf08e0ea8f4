//! A Spot interruption warning through the real `nth-lambda` binary, on moto and either
//! Kubernetes backend (the emulator, or a real control plane when `KUBEBUILDER_ASSETS` is
//! set): what an operator would check afterwards.

use nth_tests::cluster::Backend;
use nth_tests::fixtures::foreign_marks_kept;
use nth_tests::kube::state::is_terminating;
use nth_tests::on_both_backends;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{sandbox_behaviour, Sandbox, APP_NAMESPACE, PDB_NAME};
use serde_json::{json, Value};

async fn sandbox(backend: Backend, env: &[(&str, &str)]) -> anyhow::Result<Sandbox> {
    Sandbox::start_on(backend, env, sandbox_behaviour()).await
}

fn names(pods: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = pods
        .iter()
        .filter_map(|p| {
            p.pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

on_both_backends! {
    async fn spot_interruption_cordons_taints_and_drains_the_node(backend: Backend) -> anyhow::Result<()> {
        let sandbox = sandbox(backend, &[]).await?;
        let node = sandbox.node_name().to_owned();

        let outcome = sandbox
            .invoke(sandbox.spot_event("5c3e9a7e-0000-4000-8000-000000000001"))
            .await?;

        let Outcome::Response(response) = &outcome else {
            panic!(
                "invocation failed: {outcome:?}\nlogs:\n{}",
                sandbox.lambda.output().join("\n")
            );
        };
        assert_eq!(response["results"][0]["outcome"], "drained", "{response:#}");

        let marked = sandbox.kube.node(&node).await?.expect("node still exists");
        assert_eq!(marked["spec"]["unschedulable"], true, "node is cordoned");
        let taints = marked["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            taints.iter().any(|t| t["key"] == "node-termination-handler/spot-itn" && t["effect"] == "NoSchedule"),
            "spot taint present: {taints:?}"
        );
        foreign_marks_kept(&marked).map_err(anyhow::Error::msg)?;
        assert_eq!(
            marked["metadata"]["annotations"]["node-termination-handler/event-id"],
            "5c3e9a7e-0000-4000-8000-000000000001"
        );

        // Only the DaemonSet pod and the mirror pod remain; every workload pod is gone.
        let left = sandbox.kube.pods_on(&node).await?;
        assert_eq!(
            names(&left),
            vec![
                format!("aws-node-{}", node.split('.').next().unwrap_or_default()),
                format!("kube-proxy-{node}")
            ],
            "pods left on the node"
        );
        assert!(
            left.iter().all(|p| !is_terminating(p)),
            "DaemonSet and mirror pods were not evicted"
        );

        // The PDB (maxUnavailable 1 over 2 pods) never had fewer than 1 healthy pod.
        assert_eq!(
            sandbox.kube.pdb_min_healthy(APP_NAMESPACE, PDB_NAME),
            Some(1),
            "PDB respected: lowest healthy count"
        );
        if let Some(emu) = sandbox.kube.emulator() {
            let refused = emu.world(|w| w.record.evictions_refused);
            assert!(
                refused >= 1,
                "the second checkout pod had to wait for its budget (refusals: {refused})"
            );
        }

        // `kubectl describe node` tells the story.
        let reasons = sandbox.kube.event_reasons(&node).await?;
        assert_eq!(
            reasons,
            vec!["SpotInterruption".to_owned(), "Drained".to_owned()]
        );

        // Every request carried a well-formed, correctly signed EKS token.
        assert!(
            sandbox.kube.auth_failures().is_empty(),
            "{:?}",
            sandbox.kube.auth_failures()
        );
        let tokens = sandbox.kube.tokens_seen();
        assert!(tokens.iter().all(|t| t.starts_with("k8s-aws-v1.")), "{tokens:?}");
        // The real API server keeps an accepted token for 10 s without asking the webhook
        // again, so a token an earlier test of this binary used may not be seen.
        if sandbox.kube.emulator().is_some() {
            assert!(!tokens.is_empty());
        }
        Ok(())
    }
}

on_both_backends! {
    async fn malformed_spot_event_fails_the_invocation_naming_the_field(backend: Backend) -> anyhow::Result<()> {
        let sandbox = sandbox(backend, &[]).await?;
        let mut event = sandbox.spot_event("bad-1");
        event["detail"] = json!({"instance-action": "terminate"});
        let before = sandbox.kube.node(sandbox.node_name()).await?;

        let outcome = sandbox.invoke(event).await?;

        let Outcome::Error {
            error_type,
            message,
        } = outcome
        else {
            panic!("a malformed event must fail the invocation, got {outcome:?}");
        };
        assert_eq!(error_type, "MalformedEvent");
        assert!(message.contains("instance-id"), "{message}");
        // Nothing was touched.
        let node = sandbox.kube.node(sandbox.node_name()).await?;
        assert_eq!(node, before, "the node is untouched");
        assert!(node.expect("node")["spec"].get("unschedulable").is_none());
        Ok(())
    }
}

on_both_backends! {
    async fn unknown_detail_type_succeeds_with_a_logged_skip(backend: Backend) -> anyhow::Result<()> {
        let sandbox = sandbox(backend, &[]).await?;
        let before = sandbox.kube.node(sandbox.node_name()).await?;
        let event = json!({
            "version": "0", "id": "skip-1", "detail-type": "EC2 AMI State Change", "source": "aws.ec2",
            "account": "123456789012", "time": "2026-11-02T14:05:03Z", "region": "us-east-1",
            "resources": [], "detail": {"ImageId": "ami-1", "State": "available"},
        });

        let outcome = sandbox.invoke(event).await?;

        let Outcome::Response(response) = outcome else {
            panic!("an unknown event must succeed, got {outcome:?}");
        };
        assert!(response["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("EC2 AMI State Change")));
        let logged = sandbox
            .lambda
            .wait_for_line(|l| {
                serde_json::from_str::<Value>(l).is_ok_and(|r| r["message"] == "event skipped")
            })
            .await;
        assert!(logged, "skip is logged: {:?}", sandbox.lambda.output());
        assert_eq!(sandbox.kube.node(sandbox.node_name()).await?, before, "the node is untouched");
        assert_eq!(sandbox.kube.pods_on(sandbox.node_name()).await?.len(), 10, "no pod evicted");
        if let Some(emu) = sandbox.kube.emulator() {
            assert!(emu.requests().is_empty(), "no API call for a skipped event");
        }
        Ok(())
    }
}

on_both_backends! {
    async fn load_balancer_label_out_of_service_taint_and_exclusions_when_configured(
        backend: Backend
    ) -> anyhow::Result<()> {
        let sandbox = sandbox(backend, &[
            ("EXCLUDE_FROM_LOAD_BALANCERS", "true"),
            ("OUT_OF_SERVICE_TAINT", "true"),
            ("EXCLUDE_POD_LABELS", "app=checkout"),
        ])
        .await?;
        let node = sandbox.node_name().to_owned();

        let outcome = sandbox.invoke(sandbox.spot_event("opt-1")).await?;

        let Outcome::Response(response) = &outcome else {
            panic!("invocation failed: {outcome:?}");
        };
        assert_eq!(response["results"][0]["outcome"], "drained", "{response:#}");
        let marked = sandbox.kube.node(&node).await?.expect("node");
        assert_eq!(
            marked["metadata"]["labels"]["node.kubernetes.io/exclude-from-external-load-balancers"],
            "true"
        );
        let taints = marked["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(taints
            .iter()
            .any(|t| t["key"] == "node.kubernetes.io/out-of-service"
                && t["value"] == "nodeshutdown"
                && t["effect"] == "NoExecute"), "{taints:?}");
        foreign_marks_kept(&marked).map_err(anyhow::Error::msg)?;
        let left = names(&sandbox.kube.pods_on(&node).await?);
        assert_eq!(
            left.iter().filter(|n| n.starts_with("checkout-")).count(),
            2,
            "excluded pods stay: {left:?}"
        );
        assert_eq!(left.iter().filter(|n| n.starts_with("web-")).count(), 0);
        Ok(())
    }
}

on_both_backends! {
    async fn logs_carry_the_context_metrics_are_emf_and_no_secret_is_logged(backend: Backend) -> anyhow::Result<()> {
        let sandbox = sandbox(backend, &[("LOG_LEVEL", "debug")]).await?;
        let outcome = sandbox.invoke(sandbox.spot_event("obs-1")).await?;
        assert!(matches!(outcome, Outcome::Response(_)), "{outcome:?}");
        assert!(
            sandbox
                .lambda
                .wait_for_line(|l| l.contains("\"_aws\""))
                .await,
            "metrics line written"
        );
        let records = sandbox.lambda.log_records();

        // One EMF document for the invocation, with every declared metric present.
        let emf: Vec<&Value> = records.iter().filter(|r| r.get("_aws").is_some()).collect();
        assert_eq!(emf.len(), 1, "one metrics line per invocation");
        let doc = emf[0];
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "NodeTerminationHandler");
        assert!(doc["_aws"]["Timestamp"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000_000));
        for metric in directive["Metrics"].as_array().expect("metrics") {
            assert!(
                doc.get(metric["Name"].as_str().expect("name")).is_some(),
                "{metric}"
            );
        }
        assert_eq!(doc["Kind"], "spot-interruption");
        assert_eq!(doc["PodsEvicted"], 8);
        assert_eq!(doc["NodesDrained"], 1);
        assert_eq!(doc["Errors"], 0);
        assert!(doc["EventToCordon"][0]
            .as_u64()
            .is_some_and(|ms| ms < 60_000));

        // Every line logged while handling the interruption names it.
        assert!(records.iter().any(|r| r["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["node"].is_string()))));
        let inside: Vec<&Value> = records
            .iter()
            .filter(|r| {
                r["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["name"] == "interruption"))
            })
            .collect();
        assert!(inside.len() >= 3, "{records:?}");
        for record in inside {
            let span = record["spans"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "interruption"))
                .expect("span");
            for field in ["event_id", "kind", "instance_id"] {
                assert!(span[field].is_string(), "{field} missing in {record}");
            }
            // The cluster is known once the instance is resolved, before its node is.
            if span["node"].is_string() {
                assert!(span["cluster"].is_string(), "cluster missing in {record}");
            }
        }

        // No credential ever reaches the log.
        let output = sandbox.lambda.output().join("\n");
        for secret in [
            "k8s-aws-v1.",
            nth_tests::TEST_SECRET_KEY,
            nth_tests::TEST_SESSION_TOKEN,
            "X-Amz-Signature",
        ] {
            assert!(!output.contains(secret), "{secret} leaked into the logs");
        }
        Ok(())
    }
}

// One backend is enough: the event fails parsing, before any Kubernetes request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_still_counts_an_error_metric() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    let mut event = sandbox.spot_event("bad-metrics");
    event["detail"] = json!({});
    let _ = sandbox.invoke(event).await?;
    assert!(
        sandbox
            .lambda
            .wait_for_line(|l| l.contains("\"_aws\""))
            .await,
        "metrics line written"
    );
    let emf: Vec<Value> = sandbox
        .lambda
        .log_records()
        .into_iter()
        .filter(|r| r.get("_aws").is_some())
        .collect();
    assert_eq!(emf.len(), 1);
    assert_eq!(emf[0]["Errors"], 1);
    assert_eq!(emf[0]["ErrorStages"], json!(["parse"]));
    Ok(())
}
