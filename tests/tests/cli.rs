//! `nth-lambda explain` and `nth-lambda replay`, the commands operators script. `explain`
//! only reads the event and the settings; `replay` reaches the cluster, so its tests run on
//! both backends (the emulator, and a real control plane when `KUBEBUILDER_ASSETS` is set).

use std::path::PathBuf;
use std::process::Output;

use nth_tests::on_both_backends;
use nth_tests::process::workspace_binary;
use nth_tests::sandbox::{sandbox_behaviour, Sandbox};
use nth_tests::workspace_root;
use serde_json::Value;

fn sample(name: &str) -> PathBuf {
    workspace_root().join("tests/events/eventbridge").join(name)
}

fn run_cli(
    args: &[&str],
    env: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(workspace_binary("nth-lambda")?)
        .args(args)
        .env_clear()
        .envs(env)
        .output()?)
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// `nth-lambda explain` on a sample event, with no settings: its JSON plan.
fn explain(file: &str) -> anyhow::Result<Value> {
    let path = sample(file);
    let output = run_cli(
        &["explain", path.to_str().unwrap_or_default()],
        &Default::default(),
    )?;
    anyhow::ensure!(
        output.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout_json(&output))
}

#[test]
fn explain_plans_the_sample_spot_event() -> anyhow::Result<()> {
    let plan = explain("spot-interruption-warning.json")?;
    let first = &plan["interruptions"][0];
    assert_eq!(first["kind"], "spot-interruption");
    assert_eq!(first["instance_id"], "i-0b662ef9931388ba0");
    assert_eq!(first["deadline"], "2026-11-02T14:07:03Z");
    assert_eq!(first["action"], "taint+cordon+drain");
    assert_eq!(plan["skipped"], Value::Null);
    Ok(())
}

#[test]
fn explain_skips_an_event_it_does_not_handle() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ami.json");
    std::fs::write(
        &path,
        r#"{"id":"x","source":"aws.ec2","detail-type":"EC2 AMI State Change","time":"2026-11-02T14:05:03Z","detail":{}}"#,
    )?;
    let output = run_cli(
        &["explain", path.to_str().unwrap_or_default()],
        &Default::default(),
    )?;
    assert!(output.status.success());
    let plan = stdout_json(&output);
    assert_eq!(plan["interruptions"], serde_json::json!([]));
    assert!(plan["skipped"]
        .as_str()
        .is_some_and(|s| s.contains("EC2 AMI State Change")));
    Ok(())
}

#[test]
fn explain_rejects_a_malformed_event_naming_the_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.json");
    let mut event: Value = serde_json::from_str(&std::fs::read_to_string(sample(
        "spot-interruption-warning.json",
    ))?)?;
    event["detail"]
        .as_object_mut()
        .map(|d| d.remove("instance-id"));
    std::fs::write(&path, event.to_string())?;
    let output = run_cli(
        &["explain", path.to_str().unwrap_or_default()],
        &Default::default(),
    )?;
    assert!(
        !output.status.success(),
        "a malformed event must exit non-zero"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("instance-id"), "{stderr}");
    Ok(())
}

on_both_backends! {
    async fn replay_dry_run_plans_the_drain_and_changes_nothing(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        // The sample event, about the sandbox's instance.
        let mut event: Value = serde_json::from_str(&std::fs::read_to_string(sample(
            "spot-interruption-warning.json",
        ))?)?;
        event["detail"]["instance-id"] = Value::from(sandbox.instance.id.clone());
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("event.json");
        std::fs::write(&path, event.to_string())?;
        let node_before = sandbox.kube.node(sandbox.node_name()).await?;
        assert!(node_before.is_some());

        let output = run_cli(
            &["replay", path.to_str().unwrap_or_default(), "--dry-run"],
            &sandbox.cli_env(),
        )?;

        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result = stdout_json(&output);
        assert_eq!(result["results"][0]["outcome"], "dry-run", "{result:#}");
        assert_eq!(
            result["results"][0]["drain"]["evicted"]
                .as_array()
                .map(Vec::len),
            Some(8),
            "{result:#}"
        );
        // The same object, resourceVersion included: nothing was written to it.
        assert_eq!(
            sandbox.kube.node(sandbox.node_name()).await?,
            node_before,
            "node untouched"
        );
        let pods = sandbox.kube.pods_on(sandbox.node_name()).await?;
        assert_eq!(pods.len(), 10, "no pod evicted");
        assert!(
            pods.iter().all(|p| p["metadata"]["deletionTimestamp"].is_null()),
            "no pod terminating"
        );
        assert!(
            sandbox.kube.event_reasons(sandbox.node_name()).await?.is_empty(),
            "no event recorded"
        );
        if let Some(emu) = sandbox.kube.emulator() {
            let writes = emu.writes();
            assert!(writes.is_empty(), "a dry run writes nothing: {writes:?}");
        }
        Ok(())
    }
}

// One backend is enough: EC2 does not know the sample's instance, so no cluster is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_dry_run_of_the_verbatim_sample_finds_no_such_instance() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    let path = sample("spot-interruption-warning.json");
    let output = run_cli(
        &["replay", path.to_str().unwrap_or_default(), "--dry-run"],
        &sandbox.cli_env(),
    )?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout_json(&output)["results"][0]["outcome"],
        "instance unknown to EC2"
    );
    Ok(())
}

on_both_backends! {
    async fn replay_with_a_kubeconfig_drains_for_real(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        let kubeconfig = sandbox.kube.kubeconfig(nth_tests::sandbox::CLUSTER)?;
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("kubeconfig");
        std::fs::write(&config_path, kubeconfig.to_string())?;
        let event_path = dir.path().join("event.json");
        std::fs::write(&event_path, sandbox.spot_event("replay-1").to_string())?;
        let mut env = sandbox.cli_env();
        env.retain(|k, _| !k.starts_with("CLUSTER_") || k == "CLUSTER_NAME");

        let output = run_cli(
            &[
                "replay",
                event_path.to_str().unwrap_or_default(),
                "--kubeconfig",
                config_path.to_str().unwrap_or_default(),
            ],
            &env,
        )?;

        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout_json(&output)["results"][0]["outcome"], "drained");
        let node = sandbox.kube.node(sandbox.node_name()).await?.expect("node");
        assert_eq!(node["spec"]["unschedulable"], true);
        nth_tests::fixtures::foreign_marks_kept(&node).map_err(anyhow::Error::msg)?;
        assert_eq!(
            sandbox.kube.pods_on(sandbox.node_name()).await?.len(),
            2,
            "only DaemonSet and mirror pods left"
        );
        Ok(())
    }
}

#[test]
fn explain_plans_every_sample_event() -> anyhow::Result<()> {
    let expected = [
        (
            "asg-launch-lifecycle-action.json",
            "asg-launch",
            "wait-ready",
        ),
        (
            "asg-terminate-lifecycle-action.json",
            "asg-termination",
            "taint+cordon+drain",
        ),
        (
            "aws-health-scheduled-change.json",
            "scheduled-maintenance",
            "taint+cordon+drain",
        ),
        (
            "instance-state-change.json",
            "instance-stopping",
            "taint+cordon+drain",
        ),
        (
            "rebalance-recommendation.json",
            "rebalance-recommendation",
            "taint+cordon",
        ),
        (
            "spot-interruption-warning.json",
            "spot-interruption",
            "taint+cordon+drain",
        ),
    ];
    for (file, kind, action) in expected {
        let plan = explain(file)?;
        let list = plan["interruptions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!list.is_empty(), "{file}: {plan}");
        for i in list {
            assert_eq!(
                (i["kind"].as_str(), i["action"].as_str()),
                (Some(kind), Some(action)),
                "{file}"
            );
        }
    }
    Ok(())
}

#[test]
fn explain_follows_the_configured_policy() -> anyhow::Result<()> {
    let path = sample("rebalance-recommendation.json");
    let env = [("REBALANCE_DRAIN".to_owned(), "true".to_owned())]
        .into_iter()
        .collect();
    let output = run_cli(&["explain", path.to_str().unwrap_or_default()], &env)?;
    assert_eq!(
        stdout_json(&output)["interruptions"][0]["action"],
        "taint+cordon+drain"
    );
    let env = [(
        "ACTIONS".to_owned(),
        "rebalance-recommendation=ignore".to_owned(),
    )]
    .into_iter()
    .collect();
    let output = run_cli(&["explain", path.to_str().unwrap_or_default()], &env)?;
    assert_eq!(stdout_json(&output)["interruptions"][0]["action"], "ignore");
    Ok(())
}
