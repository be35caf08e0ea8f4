//! Webhook notices from the real nth-lambda binary to a receiver in the rig, with the drain
//! on either Kubernetes backend.

use nth_tests::on_both_backends;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{sandbox_behaviour, Sandbox};
use nth_tests::webhook::{Mode, Receiver};
use serde_json::Value;

fn drained(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Response(v) if v["results"][0]["outcome"] == "drained")
}

on_both_backends! {
    async fn slack_messages_follow_the_template_after_cordon_and_after_drain(backend: Backend) -> anyhow::Result<()> {
        let receiver = Receiver::start(Mode::Accept).await?;
        let sandbox = Sandbox::start_on(backend, &[
            ("WEBHOOK_URL", receiver.url.as_str()),
            // The rig's receiver speaks plain http.
            ("WEBHOOK_ALLOW_HTTP", "true"),
            ("WEBHOOK_FORMAT", "slack"),
            (
                "WEBHOOK_TEMPLATE",
                "{kind} on {node} in {cluster}: {description} ({evicted} evicted, {left} left)",
            ),
            ("WEBHOOK_HEADERS", r#"{"X-Team": "platform"}"#),
        ], sandbox_behaviour())
        .await?;
        let node = sandbox.node_name().to_owned();

        let outcome = sandbox.invoke(sandbox.spot_event("hook-1")).await?;

        assert!(drained(&outcome), "{outcome:?}");
        let texts: Vec<String> = receiver
            .received()
            .iter()
            .map(|r| r.body["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            texts,
            vec![
                format!(
                    "spot-interruption on {node} in sandbox: taint+cordon+drain (- evicted, - left)"
                ),
                format!("spot-interruption on {node} in sandbox: drain drained (8 evicted, 0 left)"),
            ]
        );
        assert!(receiver
            .received()
            .iter()
            .all(|r| r.headers.get("x-team").is_some_and(|v| v == "platform")));
        let logs = sandbox.lambda.output().join("\n");
        assert!(
            !logs.contains("XXXXSECRETPATH"),
            "the webhook URL is a credential and never logged"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn the_url_can_come_from_secrets_manager(backend: Backend) -> anyhow::Result<()> {
        let receiver = Receiver::start(Mode::Accept).await?;
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        let arn = sandbox
            .moto
            .create_secret(
                "nth/webhook",
                &serde_json::json!({
                    "url": receiver.url,
                    "headers": {"Authorization": "Bearer from-the-secret"},
                })
                .to_string(),
            )
            .await?;
        let mut env = sandbox.cli_env();
        env.insert("WEBHOOK_URL_SECRET_ARN".into(), arn);
        env.insert("WEBHOOK_FORMAT".into(), "json".into());
        // The secret's header of the same name wins over the plain setting's.
        env.insert(
            "WEBHOOK_HEADERS".into(),
            r#"{"authorization": "Bearer stale", "X-Team": "platform"}"#.into(),
        );
        // The rig's receiver speaks plain http.
        env.insert("WEBHOOK_ALLOW_HTTP".into(), "true".into());
        let dir = tempfile::tempdir()?;
        let event_path = dir.path().join("event.json");
        std::fs::write(&event_path, sandbox.spot_event("hook-secret").to_string())?;

        let output = std::process::Command::new(nth_tests::process::workspace_binary("nth-lambda")?)
            .args(["replay", event_path.to_str().unwrap_or_default()])
            .env_clear()
            .envs(&env)
            .output()?;

        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let bodies: Vec<Value> = receiver.received().into_iter().map(|r| r.body).collect();
        assert_eq!(bodies.len(), 2, "{bodies:?}");
        assert_eq!(bodies[1]["outcome"], "drained");
        assert_eq!(bodies[1]["instance_id"], sandbox.instance.id.as_str());
        for received in receiver.received() {
            let auth: Vec<_> = received.headers.get_all("authorization").iter().collect();
            assert_eq!(auth, ["Bearer from-the-secret"], "{:?}", received.headers);
            assert_eq!(received.headers["x-team"], "platform");
        }
        assert!(!String::from_utf8_lossy(&output.stderr).contains("XXXXSECRETPATH"));
        let node = sandbox.kube.node(sandbox.node_name()).await?.expect("node");
        assert_eq!(node["spec"]["unschedulable"], true);
        Ok(())
    }
}

on_both_backends! {
    async fn a_failing_or_hanging_receiver_never_fails_the_drain(backend: Backend) -> anyhow::Result<()> {
        for mode in [Mode::Refuse, Mode::Hang] {
            let receiver = Receiver::start(mode).await?;
            // Each sandbox ends with its iteration, so the real backend's lease is free again.
            let sandbox =
                Sandbox::start_on(backend, &[("WEBHOOK_URL", receiver.url.as_str()), ("WEBHOOK_ALLOW_HTTP", "true")], sandbox_behaviour())
                    .await?;

            let outcome = sandbox.invoke(sandbox.spot_event("hook-bad")).await?;

            assert!(drained(&outcome), "{mode:?}: {outcome:?}");
            assert_eq!(
                receiver.received().len(),
                4,
                "{mode:?}: two notices, each tried twice"
            );
            assert!(
                sandbox
                    .lambda
                    .wait_for_line(|l| l.contains("webhook notice dropped"))
                    .await,
                "{mode:?}: the loss is logged"
            );
        }
        Ok(())
    }
}
