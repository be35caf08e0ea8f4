//! Auto Scaling lifecycle hooks through the real `nth-lambda` binary: never another team's
//! hook released, never a hook released early because of a blip, a launch whose node is
//! named otherwise than its PrivateDnsName still found, and no drain stopped by a webhook
//! that cannot be set up.

use std::time::Duration;

use nth_tests::autoscaling::HookSettings;
use nth_tests::fixtures;
use nth_tests::moto::Instance;
use nth_tests::on_both_backends;
use nth_tests::runtime_api::{AsyncRetries, Outcome};
use nth_tests::sandbox::{event, response, sandbox_behaviour, Sandbox, APP_NAMESPACE, MANAGED_TAG};
use nth_tests::webhook::{Mode, Receiver};
use serde_json::{json, Value};

const GROUP: &str = "eks-workers-b";
const TOKEN: &str = "6c1c9ea5-0f1e-4a0e-9a51-0c0e8f8f1b2a";

fn lifecycle_event(id: &str, instance_id: &str, launch: bool) -> Value {
    let (detail_type, transition, hook) = if launch {
        (
            "EC2 Instance-launch Lifecycle Action",
            "autoscaling:EC2_INSTANCE_LAUNCHING",
            "node-join",
        )
    } else {
        (
            "EC2 Instance-terminate Lifecycle Action",
            "autoscaling:EC2_INSTANCE_TERMINATING",
            "node-drain",
        )
    };
    event(
        id,
        "aws.autoscaling",
        detail_type,
        instance_id,
        json!({
            "LifecycleActionToken": TOKEN, "AutoScalingGroupName": GROUP, "LifecycleHookName": hook,
            "EC2InstanceId": instance_id, "LifecycleTransition": transition,
            "Origin": "AutoScalingGroup", "Destination": "EC2",
        }),
    )
}

/// The token the tests' continuations carry.
const CONTINUATION_TOKEN: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A continuation of the sandbox instance's drain of `event`, as the previous round leaves
/// it: recorded on the node (the interruption and the token), and the payload carrying it.
async fn continued(
    sandbox: &Sandbox,
    event: Value,
    started: chrono::DateTime<chrono::Utc>,
    round: u32,
) -> anyhow::Result<Value> {
    sandbox
        .kube
        .patch_node(
            sandbox.node_name(),
            json!({"metadata": {"annotations": {
                "node-termination-handler/drain-continues-for": event["id"],
                "node-termination-handler/drain-continuation-token": CONTINUATION_TOKEN,
            }}}),
        )
        .await?;
    Ok(json!({"nth-continuation": {
        "event": event,
        "instance_id": sandbox.instance.id,
        "started": started,
        "round": round,
        "token": CONTINUATION_TOKEN,
    }}))
}

/// Another team's instance: tagged for another cluster, without nth's managed tag.
async fn foreign_instance(sandbox: &Sandbox) -> anyhow::Result<Instance> {
    sandbox
        .moto
        .run_instance("us-east-1b", &[("eks:cluster-name", "payments")])
        .await
}

on_both_backends! {
    async fn an_ignored_lifecycle_action_is_completed_only_for_our_own_instances(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(
            backend,
            &[("ACTIONS", "asg-termination=ignore,asg-launch=ignore")],
            sandbox_behaviour(),
        )
        .await?;
        let theirs = foreign_instance(&sandbox).await?;
        for (id, launch) in [("ig-1", false), ("ig-2", true)] {
            if launch {
                sandbox.aws.add_pending_with(GROUP, "node-join", &theirs.id, TOKEN, HookSettings::launching());
            } else {
                sandbox.aws.add_pending(GROUP, "node-drain", &theirs.id, TOKEN);
            }
            let r = response(sandbox.invoke(lifecycle_event(id, &theirs.id, launch)).await?, &sandbox);
            assert!(
                r["results"][0]["lifecycle"].as_str().is_some_and(|l| l.contains("not completed")),
                "{r:#}"
            );
        }
        assert!(sandbox.aws.calls().is_empty(), "another team's hooks are theirs to complete: {:?}", sandbox.aws.calls());

        // Our own instance: `ignore` means "complete at once", and the node is left alone.
        let ours = &sandbox.instance;
        sandbox.aws.add_pending(GROUP, "node-drain", &ours.id, TOKEN);
        let r = response(sandbox.invoke(lifecycle_event("ig-3", &ours.id, false)).await?, &sandbox);
        assert_eq!(r["results"][0]["lifecycle"], "completed", "{r:#}");
        let calls = sandbox.aws.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].instance_id, ours.id);
        assert_eq!(calls[0].result.as_deref(), Some("CONTINUE"));
        let node = sandbox.kube.node(sandbox.node_name()).await?.expect("node");
        assert_ne!(node["spec"]["unschedulable"], true, "ignored: not cordoned");
        Ok(())
    }
}

// Emulator only: fails the drain's pod LISTs with injected 503s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_drain_failure_fails_the_invocation_without_releasing_the_hook(
) -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    let instance = sandbox.instance.id.clone();
    sandbox
        .aws
        .add_pending(GROUP, "node-drain", &instance, TOKEN);
    // Every attempt of the drain's first pod LIST fails, as an API server restarting does.
    sandbox.emulator().inject_failures("GET", "/pods", 503, 4);

    let first = sandbox
        .invoke(lifecycle_event("blip-1", &instance, false))
        .await?;
    let Outcome::Error { message, .. } = &first else {
        panic!("a failed drain must fail the invocation so that Lambda retries it: {first:?}");
    };
    assert!(message.contains("listing pods"), "{message}");
    assert!(
        sandbox
            .aws
            .calls()
            .iter()
            .all(|c| c.action != "CompleteLifecycleAction"),
        "the hook is not released with nothing drained: {:?}",
        sandbox.aws.calls()
    );

    // Lambda's retry of the same event drains the node and completes the action.
    let retry = response(
        sandbox
            .invoke(lifecycle_event("blip-1", &instance, false))
            .await?,
        &sandbox,
    );
    assert_eq!(retry["results"][0]["outcome"], "drained", "{retry:#}");
    assert_eq!(retry["results"][0]["lifecycle"], "completed");
    let completions: Vec<_> = sandbox
        .aws
        .calls()
        .into_iter()
        .filter(|c| c.action == "CompleteLifecycleAction")
        .collect();
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0].result.as_deref(), Some("CONTINUE"));
    Ok(())
}

on_both_backends! {
    async fn a_launch_finds_a_node_named_otherwise_by_its_provider_id(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        let instance = sandbox
            .moto
            .run_instance("us-east-1a", &[("eks:cluster-name", nth_tests::sandbox::CLUSTER), (MANAGED_TAG, "true")])
            .await?;
        // As Bottlerocket names nodes: after the instance id, not the PrivateDnsName.
        sandbox
            .kube
            .add_node(fixtures::node(&instance.id, &instance.id, &instance.availability_zone))
            .await?;
        sandbox.aws.add_pending_with(GROUP, "node-join", &instance.id, TOKEN, HookSettings::launching());

        let r = response(
            sandbox.runtime.invoke(lifecycle_event("ln-named", &instance.id, true), Duration::from_secs(60)).await?,
            &sandbox,
        );

        assert_eq!(r["results"][0]["outcome"], "node-ready", "{r:#}");
        assert_eq!(r["results"][0]["node"], instance.id.as_str());
        assert_eq!(r["results"][0]["lifecycle"], "completed");
        Ok(())
    }
}

// Emulator only: what is under test is the function's set-up, not Kubernetes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_secret_that_cannot_be_read_never_stops_a_drain() -> anyhow::Result<()> {
    let missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nth/gone-AbCdEf";
    let sandbox = Sandbox::start(&[("WEBHOOK_URL_SECRET_ARN", missing)]).await?;

    let r = response(
        sandbox.invoke(sandbox.spot_event("no-hook-1")).await?,
        &sandbox,
    );

    assert_eq!(r["results"][0]["outcome"], "drained", "{r:#}");
    let logged = sandbox
        .lambda
        .wait_for_line(|l| l.contains("webhook unavailable") && l.contains("nth/gone"))
        .await;
    assert!(
        logged,
        "the reason is logged: {:?}",
        sandbox.lambda.output()
    );
    // The metrics line is written before the answer, but the pipe is read concurrently.
    let counted = sandbox
        .lambda
        .wait_for_line(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["WebhookUnavailable"] == 1)
        })
        .await;
    assert!(counted, "and counted in the invocation's metrics");
    Ok(())
}

// Emulator only: what is under test is the function's own limit, not Kubernetes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_arriving_after_the_drain_limit_ends_the_drain_at_once() -> anyhow::Result<()>
{
    let sandbox = Sandbox::start(&[("MAX_DRAIN_SECONDS", "600")]).await?;
    let instance = sandbox.instance.id.clone();
    sandbox
        .aws
        .add_pending(GROUP, "node-drain", &instance, TOKEN);
    // Lambda delivered the continuation late: the drain began 20 minutes ago, its limit
    // (10 minutes) passed 10 minutes ago.
    let started = chrono::Utc::now() - chrono::Duration::minutes(20);
    let continuation = continued(
        &sandbox,
        lifecycle_event("late-1", &instance, false),
        started,
        3,
    )
    .await?;

    let r = response(sandbox.invoke(continuation).await?, &sandbox);

    // The node's pods would leave within seconds: a drain that ran on would complete. The
    // limit ends it before that, and the hook is released.
    assert_eq!(r["results"][0]["outcome"], "drain-incomplete", "{r:#}");
    assert_eq!(r["results"][0]["lifecycle"], "completed", "{r:#}");
    assert!(
        sandbox.runtime.queue().async_outcomes().is_empty(),
        "no further round is started"
    );
    Ok(())
}

// Emulator only: what is under test is the function's heartbeats, not Kubernetes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continued_round_sends_its_first_heartbeat_at_once() -> anyhow::Result<()> {
    // A heartbeat interval longer than the whole drain: only a beat at the round's start is
    // sent at all.
    let sandbox = Sandbox::start(&[("LIFECYCLE_HEARTBEAT_SECONDS", "600")]).await?;
    let instance = sandbox.instance.id.clone();
    sandbox
        .aws
        .add_pending(GROUP, "node-drain", &instance, TOKEN);
    let started = chrono::Utc::now() - chrono::Duration::minutes(5);
    let continuation = continued(
        &sandbox,
        lifecycle_event("round-2", &instance, false),
        started,
        2,
    )
    .await?;

    let r = response(sandbox.invoke(continuation).await?, &sandbox);

    assert_eq!(r["results"][0]["outcome"], "drained", "{r:#}");
    assert_eq!(
        sandbox.aws.count("RecordLifecycleActionHeartbeat"),
        1,
        "the round began with a heartbeat: {:?}",
        sandbox.aws.actions()
    );
    Ok(())
}

on_both_backends! {
    async fn the_hook_is_completed_before_lambdas_deadline_with_a_hanging_webhook(backend: Backend) -> anyhow::Result<()> {
        // The function's timeout; past it the rig, as Lambda, kills the run.
        const TIMEOUT: Duration = Duration::from_secs(12);
        let receiver = Receiver::start(Mode::Hang).await?;
        // A drain limit too near for another round: this invocation must answer the hook.
        let sandbox = Sandbox::start_on(
            backend,
            &[
                ("WEBHOOK_URL", receiver.url.as_str()),
                // The rig's receiver speaks plain http.
                ("WEBHOOK_ALLOW_HTTP", "true"),
                ("MAX_DRAIN_SECONDS", "20"),
            ],
            sandbox_behaviour(),
        )
        .await?;
        let instance = sandbox.instance.id.clone();
        sandbox.aws.add_pending(GROUP, "node-drain", &instance, TOKEN);
        // Every workload pod is held by its budget, so the drain runs until it must stop.
        freeze_web(&sandbox).await?;
        // Auto Scaling answers slowly, within the SDK's attempt timeout.
        sandbox
            .aws
            .delay("CompleteLifecycleAction", Duration::from_millis(2500), 1);

        let invoked = std::time::Instant::now();
        let outcome = sandbox
            .runtime
            .invoke(lifecycle_event("hang-1", &instance, false), TIMEOUT)
            .await?;

        let r = response(outcome, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "drain-incomplete", "{r:#}");
        assert_eq!(r["results"][0]["lifecycle"], "completed", "{r:#}");
        let (result, completed_at) = sandbox.aws.pending()[0]
            .completed
            .clone()
            .expect("the hook was completed");
        assert_eq!(result, "CONTINUE");
        assert!(
            completed_at.duration_since(invoked) < TIMEOUT,
            "completed {:?} into a {TIMEOUT:?} invocation",
            completed_at.duration_since(invoked)
        );
        Ok(())
    }
}

// Emulator only: what is under test is how Lambda delivers asynchronous invocations again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_asynchronous_invocation_is_delivered_twice_more_within_its_maximum_age(
) -> anyhow::Result<()> {
    let sandbox = Sandbox::start(&[]).await?;
    let queue = sandbox.runtime.queue();
    let retries = AsyncRetries {
        first_delay: Duration::from_millis(200),
        ..AsyncRetries::default()
    };
    queue.set_retries(retries.clone());
    // A payload nth refuses: the invocation fails, and Lambda tries it again.
    queue.invoke_async(json!({"detail-type": "EC2 Spot Instance Interruption Warning"}));
    queue.set_retries(AsyncRetries {
        max_event_age: Duration::from_millis(100),
        ..retries
    });
    queue.invoke_async(json!({"detail-type": "EC2 Spot Instance Interruption Warning"}));

    let finished = async {
        while !queue.async_invocations().iter().all(|i| i.finished) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), finished).await?;

    let invocations = queue.async_invocations();
    let attempts: Vec<usize> = invocations.iter().map(|i| i.attempts.len()).collect();
    assert_eq!(attempts, [3, 1], "{invocations:#?}");
    assert!(invocations.iter().all(|i| matches!(
        i.outcome(),
        Some(Outcome::Error { error_type, .. }) if error_type == "MalformedEvent"
    )));
    Ok(())
}

/// Holds every `web` pod of the sandbox on its node.
async fn freeze_web(sandbox: &Sandbox) -> anyhow::Result<()> {
    sandbox
        .kube
        .add_pdb(fixtures::pdb_max_unavailable(
            APP_NAMESPACE,
            "web-frozen",
            "web",
            0,
        ))
        .await
}

on_both_backends! {
    async fn a_hook_is_kept_alive_through_a_drain_several_invocations_long(backend: Backend) -> anyhow::Result<()> {
        // Each invocation drains for 5 s; the hook gives up 3 s after the last heartbeat,
        // far sooner than the configured heartbeat interval.
        const TIMEOUT: Duration = Duration::from_secs(11);
        let sandbox = Sandbox::start_on(
            backend,
            &[("LIFECYCLE_HEARTBEAT_SECONDS", "60")],
            sandbox_behaviour(),
        )
        .await?;
        sandbox.runtime.queue().set_timeout(TIMEOUT);
        let instance = sandbox.instance.id.clone();
        let hook = HookSettings {
            heartbeat_timeout: Duration::from_secs(3),
            ..HookSettings::default()
        };
        sandbox
            .aws
            .add_pending_with(GROUP, "node-drain", &instance, TOKEN, hook);
        freeze_web(&sandbox).await?;

        let first = response(
            sandbox
                .runtime
                .invoke(lifecycle_event("alive-1", &instance, false), TIMEOUT)
                .await?,
            &sandbox,
        );
        // Into the second round, then the pods may go.
        tokio::time::sleep(Duration::from_secs(4)).await;
        sandbox
            .kube
            .patch_pdb(APP_NAMESPACE, "web-frozen", json!({"spec": {"maxUnavailable": 1}}))
            .await?;
        let began = std::time::Instant::now();
        while sandbox.aws.pending()[0].completed.is_none() && began.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        assert_eq!(first["results"][0]["outcome"], "drain-continues", "{first:#}");
        let action = sandbox.aws.pending().remove(0);
        assert!(!action.timed_out, "the hook gave up: {:?}", action.heartbeats);
        assert_eq!(action.completed.map(|(r, _)| r).as_deref(), Some("CONTINUE"));
        assert!(sandbox.runtime.queue().async_outcomes().len() >= 2, "several rounds");
        Ok(())
    }
}

on_both_backends! {
    async fn a_drain_ends_before_the_hooks_global_timeout(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        let instance = sandbox.instance.id.clone();
        // Heartbeats keep the action alive, but Auto Scaling waits 100 heartbeat timeouts at
        // most: 200 s, of which 190 have passed when this round begins.
        let hook = HookSettings {
            heartbeat_timeout: Duration::from_secs(2),
            ..HookSettings::default()
        };
        sandbox
            .aws
            .add_pending_with(GROUP, "node-drain", &instance, TOKEN, hook);
        let age = Duration::from_secs(190);
        sandbox.aws.backdate(&instance, age);
        let mut event = lifecycle_event("global-1", &instance, false);
        event["time"] = json!((chrono::Utc::now() - chrono::Duration::from_std(age)?)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        freeze_web(&sandbox).await?;

        let r = response(
            sandbox
                .runtime
                .invoke(event, Duration::from_secs(30))
                .await?,
            &sandbox,
        );

        assert_eq!(r["results"][0]["outcome"], "drain-incomplete", "{r:#}");
        assert_eq!(r["results"][0]["lifecycle"], "completed", "{r:#}");
        let action = sandbox.aws.pending().remove(0);
        assert!(!action.timed_out, "completed before Auto Scaling gave up");
        assert_eq!(action.completed.map(|(r, _)| r).as_deref(), Some("CONTINUE"));
        assert!(
            sandbox.runtime.queue().async_outcomes().is_empty(),
            "no round beyond the hook's end"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn a_continuation_the_function_did_not_send_is_refused(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        let instance = sandbox.instance.id.clone();
        sandbox.aws.add_pending(GROUP, "node-drain", &instance, TOKEN);
        let event = lifecycle_event("forged-round", &instance, false);
        let before = sandbox.kube.node(sandbox.node_name()).await?;
        // Anyone allowed to invoke the function could send this: a drain "continued" from an
        // event that never started one, with a guessed token.
        let forged = json!({"nth-continuation": {
            "event": event,
            "instance_id": instance,
            "started": chrono::Utc::now() - chrono::Duration::minutes(1),
            "round": 2,
            "token": "00000000000000000000000000000000",
        }});

        let r = response(sandbox.invoke(forged).await?, &sandbox);

        let outcome = r["results"][0]["outcome"].as_str().unwrap_or_default();
        assert!(outcome.starts_with("refused: continuation round 2"), "{r:#}");
        assert!(r["results"][0]["lifecycle"].as_str().is_some_and(|l| l.starts_with("not completed")), "{r:#}");
        assert_eq!(sandbox.kube.node(sandbox.node_name()).await?, before, "nothing written");
        assert!(sandbox.aws.calls().is_empty(), "the hook is not touched");

        // With the token the node holds, the same round is believed.
        let real = continued(&sandbox, event, chrono::Utc::now(), 2).await?;
        let r = response(sandbox.invoke(real).await?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "drained", "{r:#}");
        Ok(())
    }
}

on_both_backends! {
    async fn a_termination_event_auto_scaling_is_not_waiting_on_is_refused(backend: Backend) -> anyhow::Result<()> {
        let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour()).await?;
        // In service in its group (moto's Auto Scaling), with a node: nothing is terminating it.
        let serving = sandbox
            .moto
            .run_group(
                GROUP,
                &[
                    ("eks:cluster-name", nth_tests::sandbox::CLUSTER, true),
                    (MANAGED_TAG, "true", true),
                ],
            )
            .await?;
        sandbox.add_node(&serving, 2).await?;
        let before = sandbox.kube.node(&serving.private_dns_name).await?;
        let in_service = response(
            sandbox.invoke(lifecycle_event("forged-term-1", &serving.id, false)).await?,
            &sandbox,
        );
        // In no group at all.
        let loose = response(
            sandbox
                .invoke(lifecycle_event("forged-term-2", &sandbox.instance.id, false))
                .await?,
            &sandbox,
        );

        let outcome = |r: &Value| r["results"][0]["outcome"].as_str().unwrap_or_default().to_owned();
        assert!(outcome(&in_service).starts_with("refused: ") && outcome(&in_service).contains("InService"), "{in_service:#}");
        assert!(outcome(&loose).contains("in no Auto Scaling group"), "{loose:#}");
        assert_eq!(sandbox.kube.node(&serving.private_dns_name).await?, before, "nothing written");
        let home = sandbox.kube.node(sandbox.node_name()).await?.expect("node");
        assert_ne!(home["spec"]["unschedulable"], true);
        assert!(sandbox.aws.calls().is_empty(), "no lifecycle call");
        Ok(())
    }
}

on_both_backends! {
    async fn the_lifecycle_action_is_completed_after_the_configured_delay(backend: Backend) -> anyhow::Result<()> {
        // Load balancers take a while to deregister the instance once its pods are gone.
        let sandbox = Sandbox::start_on(
            backend,
            &[("LIFECYCLE_COMPLETION_DELAY_SECONDS", "3"), ("LIFECYCLE_HEARTBEAT_SECONDS", "1")],
            sandbox_behaviour(),
        )
        .await?;
        let instance = sandbox.instance.id.clone();
        sandbox.aws.add_pending(GROUP, "node-drain", &instance, TOKEN);

        let invoked = std::time::Instant::now();
        let r = response(sandbox.invoke(lifecycle_event("delay-1", &instance, false)).await?, &sandbox);

        assert_eq!(r["results"][0]["outcome"], "drained", "{r:#}");
        assert_eq!(r["results"][0]["lifecycle"], "completed", "{r:#}");
        let drained_after = std::time::Duration::from_millis(
            r["results"][0]["drain"]["duration_ms"].as_u64().unwrap_or_default(),
        );
        let action = sandbox.aws.pending().remove(0);
        let (result, completed_at) = action.completed.expect("completed");
        assert_eq!(result, "CONTINUE");
        let waited = completed_at.duration_since(invoked).saturating_sub(drained_after);
        assert!(waited >= std::time::Duration::from_secs(3), "completed {waited:?} after the drain");
        assert!(
            action.heartbeats.iter().any(|h| h.duration_since(invoked) > drained_after),
            "the hook was kept alive during the delay"
        );
        Ok(())
    }
}
