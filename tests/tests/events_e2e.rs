//! Every EventBridge event kind through the real `nth-lambda` binary on the rig: the node,
//! its pods and the Auto Scaling lifecycle calls, as an operator would check them.

use std::time::Duration;

use nth_tests::autoscaling::HookSettings;
use nth_tests::cluster::Backend;
use nth_tests::fixtures::{self, our_taint_keys, taint_keys};
use nth_tests::kube::state::is_terminating;
use nth_tests::on_both_backends;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{
    event, response, sandbox_behaviour, Sandbox, APP_NAMESPACE, CLUSTER, MANAGED_TAG, PDB_NAME,
};
use serde_json::{json, Value};

const GROUP: &str = "eks-workers-a";
const HOOK: &str = "node-drain";
const TOKEN: &str = "0befcbdb-6ecd-498a-9ff7-ae9b54447cd6";

/// The sandbox, with its world seeded, on `backend`.
async fn start(backend: Backend, env: &[(&str, &str)]) -> anyhow::Result<Sandbox> {
    Sandbox::start_on(backend, env, sandbox_behaviour()).await
}

/// The node as `kubectl get node -o json` shows it; it must exist.
async fn node(sandbox: &Sandbox, name: &str) -> anyhow::Result<Value> {
    sandbox
        .kube
        .node(name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("node {name} is gone"))
}

/// Workload pods (not DaemonSet or mirror) still on the node and not terminating.
async fn workload_pods(sandbox: &Sandbox, node: &str) -> anyhow::Result<usize> {
    Ok(sandbox
        .kube
        .pods_on(node)
        .await?
        .iter()
        .filter(|p| {
            let owner = p["metadata"]["ownerReferences"][0]["kind"].as_str();
            owner == Some("ReplicaSet") && !is_terminating(p)
        })
        .count())
}

fn lifecycle_event(sandbox: &Sandbox, id: &str, detail_type: &str, destination: &str) -> Value {
    event(
        id,
        "aws.autoscaling",
        detail_type,
        &sandbox.instance.id,
        json!({
            "LifecycleActionToken": TOKEN,
            "AutoScalingGroupName": GROUP,
            "LifecycleHookName": HOOK,
            "EC2InstanceId": sandbox.instance.id,
            "LifecycleTransition": if detail_type.contains("terminate") {
                "autoscaling:EC2_INSTANCE_TERMINATING"
            } else {
                "autoscaling:EC2_INSTANCE_LAUNCHING"
            },
            "Origin": "AutoScalingGroup",
            "Destination": destination,
        }),
    )
}

/// A launch lifecycle action for `instance_id` on the hook `node-join`.
fn launch_event(id: &str, instance_id: &str) -> Value {
    event(
        id,
        "aws.autoscaling",
        "EC2 Instance-launch Lifecycle Action",
        instance_id,
        json!({
            "LifecycleActionToken": TOKEN, "AutoScalingGroupName": GROUP, "LifecycleHookName": "node-join",
            "EC2InstanceId": instance_id, "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
        }),
    )
}

fn terminate_event(sandbox: &Sandbox, id: &str) -> Value {
    lifecycle_event(
        sandbox,
        id,
        "EC2 Instance-terminate Lifecycle Action",
        "EC2",
    )
}

fn state_event(sandbox: &Sandbox, id: &str, state: &str) -> Value {
    event(
        id,
        "aws.ec2",
        "EC2 Instance State-change Notification",
        &sandbox.instance.id,
        json!({"instance-id": sandbox.instance.id, "state": state}),
    )
}

on_both_backends! {
    async fn rebalance_recommendation_taints_and_cordons_without_draining(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let id = &sandbox.instance.id;
        let ev = event(
            "rb-1",
            "aws.ec2",
            "EC2 Instance Rebalance Recommendation",
            id,
            json!({"instance-id": id}),
        );
        let r = response(sandbox.invoke(ev).await?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "marked");
        let node = node(&sandbox, sandbox.node_name()).await?;
        assert_eq!(node["spec"]["unschedulable"], true);
        assert!(
            taint_keys(&node).contains(&"node-termination-handler/rebalance-recommendation".to_owned())
        );
        fixtures::foreign_marks_kept(&node).map_err(anyhow::Error::msg)?;
        assert_eq!(
            workload_pods(&sandbox, sandbox.node_name()).await?,
            8,
            "no pod evicted"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn rebalance_recommendation_drains_when_configured(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[("REBALANCE_DRAIN", "true")]).await?;
        let id = &sandbox.instance.id;
        let ev = event(
            "rb-2",
            "aws.ec2",
            "EC2 Instance Rebalance Recommendation",
            id,
            json!({"instance-id": id}),
        );
        let r = response(sandbox.invoke(ev).await?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "drained");
        assert_eq!(workload_pods(&sandbox, sandbox.node_name()).await?, 0);
        Ok(())
    }
}

on_both_backends! {
    async fn terminate_lifecycle_drains_then_completes_and_a_duplicate_is_a_no_op(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        sandbox
            .aws
            .add_pending(GROUP, HOOK, &sandbox.instance.id, TOKEN);

        let r = response(
            sandbox.invoke(terminate_event(&sandbox, "tl-1")).await?,
            &sandbox,
        );

        assert_eq!(r["results"][0]["outcome"], "drained");
        assert_eq!(r["results"][0]["lifecycle"], "completed");
        let node = node(&sandbox, sandbox.node_name()).await?;
        assert!(taint_keys(&node)
            .contains(&"node-termination-handler/asg-lifecycle-termination".to_owned()));
        fixtures::foreign_marks_kept(&node).map_err(anyhow::Error::msg)?;
        assert_eq!(workload_pods(&sandbox, sandbox.node_name()).await?, 0);
        let pending = sandbox.aws.pending();
        let (result, _) = pending[0]
            .completed
            .clone()
            .expect("lifecycle action completed");
        assert_eq!(result, "CONTINUE");
        let completes: Vec<_> = sandbox
            .aws
            .calls()
            .into_iter()
            .filter(|c| c.action == "CompleteLifecycleAction")
            .collect();
        assert_eq!(completes.len(), 1);
        assert_eq!(
            (
                completes[0].instance_id.as_str(),
                completes[0].token.as_str()
            ),
            (sandbox.instance.id.as_str(), TOKEN)
        );

        // EventBridge delivers at least once: the same event again.
        let terminations_before = sandbox.kube.terminations().len();
        let again = response(
            sandbox.invoke(terminate_event(&sandbox, "tl-1")).await?,
            &sandbox,
        );
        assert_eq!(again["results"][0]["outcome"], "already-drained");
        assert_eq!(again["results"][0]["lifecycle"], "already-completed");
        assert_eq!(
            sandbox.kube.terminations().len(),
            terminations_before,
            "no second drain"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn heartbeats_keep_the_hook_alive_while_a_pdb_holds_the_drain(backend: Backend) -> anyhow::Result<()> {
        let mut behaviour = sandbox_behaviour();
        behaviour.replacement_ready_delay = Duration::from_secs(4);
        let sandbox =
            Sandbox::start_on(backend, &[("LIFECYCLE_HEARTBEAT_SECONDS", "1")], behaviour).await?;
        sandbox
            .aws
            .add_pending(GROUP, HOOK, &sandbox.instance.id, TOKEN);

        let r = response(
            sandbox.invoke(terminate_event(&sandbox, "tl-hb")).await?,
            &sandbox,
        );

        assert_eq!(r["results"][0]["outcome"], "drained");
        let action = sandbox.aws.pending().remove(0);
        let (_, completed_at) = action.completed.expect("completed");
        assert!(
            action.heartbeats.len() >= 2,
            "heartbeats while the PDB held the drain: {}",
            action.heartbeats.len()
        );
        assert!(
            action.heartbeats.iter().all(|h| *h < completed_at),
            "every heartbeat came before the completion"
        );
        assert!(
            sandbox.kube.pdb_min_healthy(APP_NAMESPACE, PDB_NAME) >= Some(1),
            "the budget was respected"
        );
        if let Some(emu) = sandbox.kube.emulator() {
            assert!(
                emu.world(|w| w.record.evictions_refused) >= 1,
                "the PDB did hold the drain"
            );
        }
        Ok(())
    }
}

/// The function timeout of the long-drain tests: each invocation drains for 5 s (6 s are kept
/// for what follows the drain), so a drain held up for longer needs several.
const SHORT_TIMEOUT: Duration = Duration::from_secs(11);

/// The budget that holds every `web` pod on its node until released.
const FROZEN: &str = "web-frozen";

/// Holds every `web` pod on its node.
async fn freeze_web(sandbox: &Sandbox) -> anyhow::Result<()> {
    sandbox
        .kube
        .add_pdb(fixtures::pdb_max_unavailable(
            APP_NAMESPACE,
            FROZEN,
            "web",
            0,
        ))
        .await
}

/// Lets the `web` pods go, one at a time.
async fn release_web(sandbox: &Sandbox) -> anyhow::Result<()> {
    sandbox
        .kube
        .patch_pdb(
            APP_NAMESPACE,
            FROZEN,
            json!({"spec": {"maxUnavailable": 1}}),
        )
        .await
}

/// Waits until Auto Scaling's pending action has been answered.
async fn wait_for_completion(sandbox: &Sandbox, within: Duration) -> Option<String> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if let Some((result, _)) = sandbox.aws.pending()[0].completed.clone() {
            return Some(result);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The node's record of a drain going on in another invocation.
async fn continuing_annotation(sandbox: &Sandbox) -> anyhow::Result<Value> {
    Ok(
        node(sandbox, sandbox.node_name()).await?["metadata"]["annotations"]
            ["node-termination-handler/drain-continues-for"]
            .clone(),
    )
}

/// Waits until every invocation the function made of itself has answered: the last round
/// completes the lifecycle action before it answers.
async fn wait_for_chain_end(sandbox: &Sandbox, within: Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < within
        && continuation_outcomes(sandbox)
            .iter()
            .any(|o| o == "running")
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The outcomes of the function's invocations of itself, in order.
fn continuation_outcomes(sandbox: &Sandbox) -> Vec<String> {
    sandbox
        .runtime
        .queue()
        .async_outcomes()
        .iter()
        .map(|(payload, outcome)| {
            assert!(payload["nth-continuation"]["round"].is_u64(), "{payload}");
            match outcome {
                Some(Outcome::Response(v)) => v["results"][0]["outcome"]
                    .as_str()
                    .unwrap_or("no result")
                    .to_owned(),
                Some(Outcome::Error { message, .. }) => format!("error: {message}"),
                None => "running".to_owned(),
            }
        })
        .collect()
}

/// The grace period of the seeded pods (`terminationGracePeriodSeconds`).
const POD_GRACE: i64 = 30;

/// Whether an evicted pod kept its own grace period: the eviction asked for none (the
/// emulator's record), or the pod terminated with its own (the real server's).
fn own_grace(grace: &Option<i64>) -> bool {
    grace.is_none_or(|g| g == POD_GRACE)
}

on_both_backends! {
    async fn a_drain_longer_than_an_invocation_continues_in_the_next(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[("LIFECYCLE_HEARTBEAT_SECONDS", "1")]).await?;
        sandbox.runtime.queue().set_timeout(SHORT_TIMEOUT);
        freeze_web(&sandbox).await?;
        sandbox
            .aws
            .add_pending(GROUP, HOOK, &sandbox.instance.id, TOKEN);
        let event = terminate_event(&sandbox, "tl-long");

        let first = response(
            sandbox.runtime.invoke(event.clone(), SHORT_TIMEOUT).await?,
            &sandbox,
        );
        // EventBridge delivers the event a second time while the drain goes on.
        let duplicate = response(
            sandbox.runtime.invoke(event.clone(), SHORT_TIMEOUT).await?,
            &sandbox,
        );
        release_web(&sandbox).await?;
        let completed = wait_for_completion(&sandbox, Duration::from_secs(60)).await;

        assert_eq!(first["results"][0]["outcome"], "drain-continues");
        assert!(first["results"][0]["lifecycle"]
            .as_str()
            .is_some_and(|l| l.starts_with("pending")));
        assert_eq!(
            duplicate["results"][0]["outcome"],
            "drain-continuing-elsewhere"
        );
        assert_eq!(completed.as_deref(), Some("CONTINUE"));
        wait_for_chain_end(&sandbox, SHORT_TIMEOUT).await;
        let rounds = continuation_outcomes(&sandbox);
        let (last, earlier) = rounds.split_last().expect("at least one continuation");
        assert_eq!(last, "drained", "{rounds:?}");
        assert!(earlier.iter().all(|o| o == "drain-continues"), "{rounds:?}");
        // Lambda stops a chain of invocations that share a trace lineage after about 16;
        // a drain may need far more rounds, so no round passes its trace on.
        let traces = sandbox.aws.invoke_traces();
        assert_eq!(traces.len(), rounds.len());
        assert!(traces.iter().all(Option::is_none), "{traces:?}");
        assert_eq!(workload_pods(&sandbox, sandbox.node_name()).await?, 0);
        let completions = sandbox
            .aws
            .calls()
            .iter()
            .filter(|c| c.action == "CompleteLifecycleAction")
            .count();
        assert_eq!(
            completions, 1,
            "answered once, by the invocation that finished"
        );
        // Once the chain has ended, the event delivered yet again is what any duplicate is.
        let late = response(
            sandbox.runtime.invoke(event, SHORT_TIMEOUT).await?,
            &sandbox,
        );
        assert_eq!(late["results"][0]["outcome"], "already-drained");
        assert_eq!(continuing_annotation(&sandbox).await?, Value::Null);
        let marked = node(&sandbox, sandbox.node_name()).await?;
        fixtures::foreign_marks_kept(&marked).map_err(anyhow::Error::msg)?;
        // `kubectl describe node`: one story, not one line per round.
        let reasons = sandbox.kube.event_reasons(sandbox.node_name()).await?;
        assert_eq!(reasons, ["ASGLifecycleTermination", "Drained"]);
        let action = sandbox.aws.pending().remove(0);
        let (_, completed_at) = action.completed.expect("completed");
        assert!(
            action.heartbeats.len() >= 4 && action.heartbeats.iter().all(|h| *h < completed_at),
            "the hook was kept alive across invocations: {} heartbeats",
            action.heartbeats.len()
        );
        Ok(())
    }
}

on_both_backends! {
    async fn a_drain_stops_at_max_drain_seconds_and_completes_the_lifecycle_action(backend: Backend) -> anyhow::Result<()> {
        // Round one, ending 5 s in, may continue (the limit is 33 s past its end); round two,
        // ending 10 s in, may not: 28 s are not worth a third (MIN_CONTINUATION is 30 s).
        let sandbox = start(backend, &[("MAX_DRAIN_SECONDS", "38")]).await?;
        sandbox.runtime.queue().set_timeout(SHORT_TIMEOUT);
        freeze_web(&sandbox).await?;
        sandbox
            .aws
            .add_pending(GROUP, HOOK, &sandbox.instance.id, TOKEN);

        let first = response(
            sandbox
                .runtime
                .invoke(terminate_event(&sandbox, "tl-late"), SHORT_TIMEOUT)
                .await?,
            &sandbox,
        );
        let completed = wait_for_completion(&sandbox, Duration::from_secs(30)).await;

        assert_eq!(first["results"][0]["outcome"], "drain-continues");
        assert_eq!(
            completed.as_deref(),
            Some("CONTINUE"),
            "scale-in must not hang"
        );
        wait_for_chain_end(&sandbox, SHORT_TIMEOUT).await;
        assert_eq!(continuation_outcomes(&sandbox), ["drain-incomplete"]);
        let (payload, outcome) = sandbox.runtime.queue().async_outcomes().remove(0);
        assert_eq!(payload["nth-continuation"]["round"], 2);
        let Some(Outcome::Response(last)) = outcome else {
            panic!("the last round answered")
        };
        assert_eq!(last["results"][0]["lifecycle"], "completed");
        let left = last["results"][0]["drain"]["left"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(left.len(), 6, "the six web pods stayed: {left:?}");
        assert!(
            left.iter().all(|p| p["reason"]
                .as_str()
                .is_some_and(|r| r.contains(FROZEN))),
            "{left:?}"
        );
        assert_eq!(
            workload_pods(&sandbox, sandbox.node_name()).await?,
            6,
            "the PDB was never broken"
        );
        assert_eq!(
            continuing_annotation(&sandbox).await?,
            Value::Null,
            "the chain ended"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn warm_pool_transition_drains_and_completes(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        sandbox
            .aws
            .add_pending(GROUP, HOOK, &sandbox.instance.id, TOKEN);
        let ev = lifecycle_event(
            &sandbox,
            "wp-1",
            "EC2 Instance-terminate Lifecycle Action",
            "WarmPool",
        );
        let r = response(sandbox.invoke(ev).await?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "drained");
        assert_eq!(r["results"][0]["lifecycle"], "completed");
        assert_eq!(workload_pods(&sandbox, sandbox.node_name()).await?, 0);
        let node = node(&sandbox, sandbox.node_name()).await?;
        fixtures::foreign_marks_kept(&node).map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

on_both_backends! {
    async fn lifecycle_test_notification_is_skipped(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let ev = event(
            "tn-1",
            "aws.autoscaling",
            "EC2 Instance-terminate Lifecycle Action",
            &sandbox.instance.id,
            json!({"AutoScalingGroupName": GROUP, "Event": "autoscaling:TEST_NOTIFICATION"}),
        );
        let r = response(sandbox.invoke(ev).await?, &sandbox);
        assert!(r["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("TEST_NOTIFICATION")));
        assert!(sandbox.aws.calls().is_empty());
        Ok(())
    }
}

on_both_backends! {
    async fn launch_lifecycle_waits_for_the_node_to_be_ready(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let instance = sandbox.managed_instance_without_node().await?;
        sandbox
            .aws
            .add_pending_with(GROUP, "node-join", &instance.id, TOKEN, HookSettings::launching());
        let ev = launch_event("ln-1", &instance.id);
        // The node joins NotReady after 2 s and turns Ready 4 s later, as a kubelet does.
        let joining = async {
            let mut not_ready = fixtures::node(&instance.private_dns_name, &instance.id, "us-east-1a");
            not_ready["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
            tokio::time::sleep(Duration::from_secs(2)).await;
            sandbox.kube.add_node(not_ready).await?;
            tokio::time::sleep(Duration::from_secs(4)).await;
            let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
            sandbox
                .kube
                .patch_node_status(&instance.private_dns_name, ready)
                .await
        };
        let (outcome, joined) = tokio::join!(sandbox.invoke(ev), joining);
        joined?;

        let r = response(outcome?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "node-ready");
        assert_eq!(r["results"][0]["lifecycle"], "completed");
        let calls = sandbox.aws.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].result.as_deref(), Some("CONTINUE"));
        Ok(())
    }
}

on_both_backends! {
    async fn launch_whose_node_never_joins_is_left_to_the_hook_default(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let instance = sandbox.managed_instance_without_node().await?;
        sandbox
            .aws
            .add_pending_with(GROUP, "node-join", &instance.id, TOKEN, HookSettings::launching());
        let ev = launch_event("ln-2", &instance.id);
        let r = response(
            sandbox.runtime.invoke(ev, Duration::from_secs(9)).await?,
            &sandbox,
        );
        assert!(
            r["results"][0]["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("never joined")),
            "{r}"
        );
        assert!(r["results"][0]["lifecycle"]
            .as_str()
            .is_some_and(|l| l.contains("default")));
        assert!(
            sandbox.aws.calls().is_empty(),
            "no completion: the hook's default result applies"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn stopping_drains_and_running_again_restores_the_node(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let name = sandbox.node_name().to_owned();
        sandbox.moto.stop_instance(&sandbox.instance.id).await?;

        let r = response(
            sandbox
                .invoke(state_event(&sandbox, "st-1", "stopping"))
                .await?,
            &sandbox,
        );
        assert_eq!(r["results"][0]["outcome"], "drained");
        let stopped = node(&sandbox, &name).await?;
        assert_eq!(stopped["spec"]["unschedulable"], true);
        assert!(taint_keys(&stopped).contains(&"node-termination-handler/instance-stopping".to_owned()));
        fixtures::foreign_marks_kept(&stopped).map_err(anyhow::Error::msg)?;
        assert_eq!(workload_pods(&sandbox, &name).await?, 0);

        // Someone else's taint, added while the instance was stopped, must survive the
        // restore: the whole list, read first, as a careful client writes it.
        let mut taints = stopped["spec"]["taints"].as_array().cloned().unwrap_or_default();
        taints.push(json!({"key": "team/maintenance", "effect": "NoSchedule"}));
        sandbox
            .kube
            .patch_node(&name, json!({"spec": {"taints": taints}}))
            .await?;
        sandbox.moto.start_instance(&sandbox.instance.id).await?;
        let r = response(
            sandbox
                .invoke(state_event(&sandbox, "st-2", "running"))
                .await?,
            &sandbox,
        );
        assert_eq!(r["results"][0]["outcome"], "uncordoned");
        let running = node(&sandbox, &name).await?;
        assert_ne!(running["spec"]["unschedulable"], true, "uncordoned");
        assert!(taint_keys(&running).contains(&"team/maintenance".to_owned()));
        assert!(our_taint_keys(&running, "node-termination-handler").is_empty());
        fixtures::foreign_marks_kept(&running).map_err(anyhow::Error::msg)?;
        assert!(running["metadata"]["annotations"]
            .get("node-termination-handler/interruption-kind")
            .is_none());
        Ok(())
    }
}

on_both_backends! {
    async fn running_leaves_a_node_someone_else_cordoned(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let name = sandbox.node_name().to_owned();
        sandbox
            .kube
            .patch_node(&name, json!({"spec": {"unschedulable": true}}))
            .await?;
        let r = response(
            sandbox
                .invoke(state_event(&sandbox, "st-3", "running"))
                .await?,
            &sandbox,
        );
        assert!(r["results"][0]["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("left alone")));
        let left = node(&sandbox, &name).await?;
        assert_eq!(left["spec"]["unschedulable"], true);
        fixtures::foreign_marks_kept(&left).map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

on_both_backends! {
    async fn pending_state_is_skipped(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let before = node(&sandbox, sandbox.node_name()).await?;
        let r = response(
            sandbox
                .invoke(state_event(&sandbox, "st-4", "pending"))
                .await?,
            &sandbox,
        );
        assert!(r["skipped"].as_str().is_some_and(|s| s.contains("pending")));
        assert_eq!(node(&sandbox, sandbox.node_name()).await?, before);
        if let Some(emu) = sandbox.kube.emulator() {
            assert!(emu.requests().is_empty(), "not even a read");
        }
        Ok(())
    }
}

on_both_backends! {
    async fn health_event_naming_three_instances_drains_all_three(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let second = sandbox.add_instance_node(&[], 3).await?;
        let third = sandbox.add_instance_node(&[], 3).await?;
        let ids = [
            sandbox.instance.id.clone(),
            second.id.clone(),
            third.id.clone(),
        ];
        let start = (chrono::Utc::now() + chrono::Duration::days(2)).to_rfc2822();
        let ev = json!({
            "version": "0", "id": "hl-1", "detail-type": "AWS Health Event", "source": "aws.health",
            "account": "123456789012", "time": chrono::Utc::now().to_rfc3339(), "region": "us-east-1",
            "resources": ids,
            "detail": {
                "eventArn": "arn:aws:health:us-east-1::event/EC2/AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED/x",
                "service": "EC2", "eventTypeCode": "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
                "eventTypeCategory": "scheduledChange", "startTime": start,
                "affectedEntities": ids.iter().map(|i| json!({"entityValue": i})).collect::<Vec<_>>(),
            },
        });

        let r = response(sandbox.invoke(ev).await?, &sandbox);

        let results = r["results"].as_array().cloned().unwrap_or_default();
        assert_eq!(results.len(), 3);
        assert!(results.iter().all(|x| x["outcome"] == "drained"), "{r:#}");
        let mut event_ids = Vec::new();
        for instance in [&sandbox.instance, &second, &third] {
            let node = node(&sandbox, &instance.private_dns_name).await?;
            assert_eq!(node["spec"]["unschedulable"], true);
            assert!(taint_keys(&node)
                .contains(&"node-termination-handler/scheduled-maintenance".to_owned()));
            fixtures::foreign_marks_kept(&node).map_err(anyhow::Error::msg)?;
            assert_eq!(workload_pods(&sandbox, &instance.private_dns_name).await?, 0);
            event_ids
                .push(node["metadata"]["annotations"]["node-termination-handler/event-id"].clone());
        }
        event_ids.dedup();
        assert_eq!(
            event_ids.len(),
            3,
            "each node records its own interruption id"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn capacity_reservation_interruption_drains(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let id = &sandbox.instance.id;
        let ev = event(
            "cr-1",
            "aws.ec2",
            "EC2 Capacity Reservation Instance Interruption Warning",
            id,
            json!({"instance-id": id, "capacity-reservation-id": "cr-0123456789abcdef0"}),
        );
        let r = response(sandbox.invoke(ev).await?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "drained");
        assert_eq!(workload_pods(&sandbox, sandbox.node_name()).await?, 0);
        Ok(())
    }
}

on_both_backends! {
    async fn unmanaged_and_foreign_instances_are_never_touched(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let unmanaged = sandbox.add_instance_node(&[(MANAGED_TAG, "")], 2).await?;
        let foreign = sandbox
            .add_instance_node(&[("eks:cluster-name", "other")], 2)
            .await?;
        for (instance, expect) in [(&unmanaged, "managed tag"), (&foreign, "cluster other")] {
            sandbox.aws.add_pending(GROUP, HOOK, &instance.id, TOKEN);
            let mut ev = terminate_event(&sandbox, &format!("nt-{}", instance.id));
            ev["detail"]["EC2InstanceId"] = json!(instance.id);
            let before = node(&sandbox, &instance.private_dns_name).await?;
            let r = response(sandbox.invoke(ev).await?, &sandbox);
            assert!(
                r["results"][0]["outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains(expect)),
                "{r}"
            );
            let after = node(&sandbox, &instance.private_dns_name).await?;
            assert!(
                after["spec"].get("unschedulable").is_none(),
                "node untouched"
            );
            assert_eq!(after, before, "node untouched");
            assert_eq!(workload_pods(&sandbox, &instance.private_dns_name).await?, 2);
        }
        assert!(
            sandbox.aws.calls().is_empty(),
            "another handler's lifecycle actions are not ours to complete"
        );
        Ok(())
    }
}

on_both_backends! {
    async fn a_group_carrying_the_managed_tag_makes_its_instances_managed(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let instance = sandbox
            .moto
            .run_group(
                "managed-group",
                &[
                    ("eks:cluster-name", CLUSTER, true),
                    (MANAGED_TAG, "true", false),
                ],
            )
            .await?;
        sandbox.add_node(&instance, 2).await?;
        // The group's instances are On-Demand: stopped, not Spot-reclaimed.
        sandbox.moto.stop_instance(&instance.id).await?;
        let ev = event(
            "mg-1",
            "aws.ec2",
            "EC2 Instance State-change Notification",
            &instance.id,
            json!({"instance-id": instance.id, "state": "stopping"}),
        );
        let r = response(sandbox.invoke(ev).await?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "drained", "{r}");
        assert!(
            sandbox.aws.actions().contains(&"DescribeTags".to_owned()),
            "the group's tags were read"
        );
        assert_eq!(workload_pods(&sandbox, &instance.private_dns_name).await?, 0);
        Ok(())
    }
}

on_both_backends! {
    async fn lifecycle_for_an_instance_without_a_node_completes(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let instance = sandbox.managed_instance_without_node().await?;
        sandbox.aws.add_pending(GROUP, HOOK, &instance.id, TOKEN);
        let mut ev = terminate_event(&sandbox, "nn-1");
        ev["detail"]["EC2InstanceId"] = json!(instance.id);
        let r = response(sandbox.invoke(ev).await?, &sandbox);
        assert!(r["results"][0]["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("no node")));
        assert_eq!(r["results"][0]["lifecycle"], "completed");
        Ok(())
    }
}

on_both_backends! {
    async fn dry_run_writes_nothing_to_kubernetes_or_auto_scaling(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[("DRY_RUN", "true")]).await?;
        sandbox
            .aws
            .add_pending(GROUP, HOOK, &sandbox.instance.id, TOKEN);
        let before = node(&sandbox, sandbox.node_name()).await?;
        let r = response(
            sandbox.invoke(terminate_event(&sandbox, "dr-1")).await?,
            &sandbox,
        );
        assert_eq!(r["results"][0]["outcome"], "dry-run");
        assert_eq!(r["results"][0]["lifecycle"], "dry-run");
        assert_eq!(node(&sandbox, sandbox.node_name()).await?, before);
        assert_eq!(workload_pods(&sandbox, sandbox.node_name()).await?, 8);
        assert!(sandbox.kube.terminations().is_empty(), "no pod evicted");
        assert!(
            sandbox
                .kube
                .event_reasons(sandbox.node_name())
                .await?
                .is_empty(),
            "no Event written"
        );
        if let Some(emu) = sandbox.kube.emulator() {
            assert!(
                emu.requests().iter().all(|r| r.method == "GET"),
                "only reads"
            );
        }
        assert!(sandbox.aws.calls().is_empty(), "no lifecycle call");
        let logged = sandbox
            .lambda
            .wait_for_line(|l| l.contains("would complete lifecycle action"))
            .await;
        assert!(logged, "the planned completion is logged");
        Ok(())
    }
}

on_both_backends! {
    async fn events_from_elsewhere_or_with_odd_times_are_handled_safely(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let mut foreign = sandbox.spot_event("rg-1");
        foreign["region"] = json!("eu-west-1");
        let r = response(sandbox.invoke(foreign).await?, &sandbox);
        assert!(
            r["skipped"]
                .as_str()
                .is_some_and(|s| s.contains("eu-west-1")),
            "{r}"
        );
        let mut other_account = sandbox.spot_event("acct-1");
        other_account["account"] = json!("999999999999");
        let r = response(sandbox.invoke(other_account).await?, &sandbox);
        assert!(
            r["skipped"]
                .as_str()
                .is_some_and(|s| s
                    .contains("event from account 999999999999; this function serves 123456789012")),
            "{r}"
        );
        if let Some(emu) = sandbox.kube.emulator() {
            assert!(emu.requests().is_empty());
        }
        assert!(sandbox.aws.actions().is_empty(), "no AWS call either");

        // A Spot warning redriven from the dead-letter queue hours later: the node is still
        // drained, but pods keep their own grace instead of being killed at once.
        let mut stale = sandbox.spot_event("old-1");
        stale["time"] = json!((chrono::Utc::now() - chrono::Duration::hours(6)).to_rfc3339());
        let r = response(sandbox.invoke(stale).await?, &sandbox);
        assert_eq!(r["results"][0]["outcome"], "drained");
        let graces = sandbox.kube.terminations();
        assert!(
            !graces.is_empty() && graces.iter().all(|(_, g)| own_grace(g)),
            "no grace clipped: {graces:?}"
        );
        let first_drain = graces.len();

        // A time far in the future (a skewed or forged clock) is malformed: the invocation
        // fails naming the field, and nothing is touched.
        let other = sandbox.add_instance_node(&[], 3).await?;
        let mut future = event(
            "future-1",
            "aws.ec2",
            "EC2 Spot Instance Interruption Warning",
            &other.id,
            json!({"instance-id": other.id, "instance-action": "terminate"}),
        );
        future["time"] = json!("2999-01-01T00:00:00Z");
        let before = sandbox.kube.node(&other.private_dns_name).await?;
        let outcome = sandbox.invoke(future).await?;
        let Outcome::Error { error_type, message } = &outcome else {
            panic!("an event dated 2999 must fail the invocation: {outcome:?}");
        };
        assert_eq!(error_type, "MalformedEvent");
        assert!(message.contains("time") && message.contains("2999"), "{message}");
        assert_eq!(sandbox.kube.node(&other.private_dns_name).await?, before, "node untouched");
        assert_eq!(sandbox.kube.terminations().len(), first_drain, "no pod evicted");
        Ok(())
    }
}

on_both_backends! {
    async fn a_node_that_only_looks_like_the_instance_is_left_alone(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let look_alike = sandbox.node_name().to_owned();
        let zone = sandbox.instance.availability_zone.clone();
        // The node named after the instance's DNS name is another instance's; the instance's
        // own node was given a custom name. (A node's providerID cannot change: the look-alike
        // is a new node of the same name; its pods stay bound to the name.)
        sandbox.kube.delete_node(&look_alike).await?;
        sandbox
            .kube
            .add_node(fixtures::node(&look_alike, "i-0123456789abcdef0", &zone))
            .await?;
        sandbox
            .kube
            .add_node(fixtures::node("custom-name-7", &sandbox.instance.id, &zone))
            .await?;

        let r = response(
            sandbox.invoke(sandbox.spot_event("look-alike-1")).await?,
            &sandbox,
        );

        assert_eq!(r["results"][0]["node"], "custom-name-7");
        let own = node(&sandbox, "custom-name-7").await?;
        assert_eq!(own["spec"]["unschedulable"], true);
        fixtures::foreign_marks_kept(&own).map_err(anyhow::Error::msg)?;
        let other = node(&sandbox, &look_alike).await?;
        assert_ne!(other["spec"]["unschedulable"], true);
        assert!(our_taint_keys(&other, "node-termination-handler").is_empty());
        fixtures::foreign_marks_kept(&other).map_err(anyhow::Error::msg)?;
        assert_eq!(workload_pods(&sandbox, &look_alike).await?, 8, "its pods stay");
        Ok(())
    }
}

on_both_backends! {
    async fn events_that_contradict_ec2_are_refused_before_any_write(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[]).await?;
        let name = sandbox.node_name().to_owned();
        let before = node(&sandbox, &name).await?;
        // Anyone allowed to invoke the function could send these: a stop of a running
        // instance, and a Spot warning for an On-Demand one.
        let stop = response(
            sandbox
                .invoke(state_event(&sandbox, "forged-1", "stopping"))
                .await?,
            &sandbox,
        );
        let on_demand = sandbox
            .add_on_demand_instance_node(2)
            .await?;
        let warning = event(
            "forged-2",
            "aws.ec2",
            "EC2 Spot Instance Interruption Warning",
            &on_demand.id,
            json!({"instance-id": on_demand.id, "instance-action": "terminate"}),
        );
        let spot = response(sandbox.invoke(warning).await?, &sandbox);

        for (r, says) in [(&stop, "EC2 says it is running"), (&spot, "not Spot")] {
            let outcome = r["results"][0]["outcome"].as_str().unwrap_or_default();
            assert!(outcome.starts_with("refused: ") && outcome.contains(says), "{r:#}");
        }
        assert_eq!(node(&sandbox, &name).await?, before, "nothing written");
        let other = node(&sandbox, &on_demand.private_dns_name).await?;
        assert_ne!(other["spec"]["unschedulable"], true);
        Ok(())
    }
}

on_both_backends! {
    async fn karpenters_nodes_can_be_left_to_karpenter(backend: Backend) -> anyhow::Result<()> {
        let sandbox = start(backend, &[("LEAVE_KARPENTER_NODES", "true")]).await?;
        let name = sandbox.node_name().to_owned();
        sandbox
            .kube
            .patch_node(&name, json!({"metadata": {"labels": {"karpenter.sh/nodepool": "default"}}}))
            .await?;
        let before = node(&sandbox, &name).await?;
        // A node Karpenter does not manage is drained as ever.
        let other = sandbox.add_instance_node(&[], 2).await?;

        let left = response(sandbox.invoke(sandbox.spot_event("karpenter-1")).await?, &sandbox);
        let warning = event(
            "karpenter-2",
            "aws.ec2",
            "EC2 Spot Instance Interruption Warning",
            &other.id,
            json!({"instance-id": other.id, "instance-action": "terminate"}),
        );
        let drained = response(sandbox.invoke(warning).await?, &sandbox);

        assert!(
            left["results"][0]["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("Karpenter's (label karpenter.sh/nodepool)")),
            "{left:#}"
        );
        assert_eq!(node(&sandbox, &name).await?, before, "Karpenter's node untouched");
        assert_eq!(drained["results"][0]["outcome"], "drained", "{drained:#}");
        Ok(())
    }
}
