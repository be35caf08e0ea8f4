//! The real `nth-agent` binary against the IMDS emulator and Kubernetes, on both backends:
//! the emulator (reached with a presigned EKS token) and, when `KUBEBUILDER_ASSETS` is set, a
//! real control plane reached as the agent's own ServiceAccount, so cluster-agent/deploy/rbac.yaml
//! judges every request. Every mark -> drain -> restore path keeps the node's foreign taints,
//! label and annotation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use nth_tests::cluster::{Backend, Cluster};
use nth_tests::fixtures::{self, foreign_marks_kept, our_taint_keys, taint_keys};
use nth_tests::imds::{Fault, ImdsEmulator};
use nth_tests::kube::{AuthConfig, Behaviour};
use nth_tests::on_both_backends;
use nth_tests::process::Process;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "agent-test";
const NODE: &str = "ip-10-0-7-21.ec2.internal";
const INSTANCE: &str = "i-0a1b2c3d4e5f60718";
const ZONE: &str = "us-east-1c";
const SPARE: &str = "ip-10-0-9-9.ec2.internal";
const PREFIX: &str = "node-termination-handler";
/// Fast polls, so each test takes seconds; the agent's logic does not depend on the period.
const POLL: &str = "200ms";
/// Long enough for a drain of a few pods on a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

struct World {
    kube: Cluster,
    imds: ImdsEmulator,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    metrics_port: u16,
}

impl World {
    /// The node (boot `boot-1`) with a DaemonSet pod, the agent's own pod, and four
    /// ReplicaSet pods; a spare node for their replacements.
    async fn start(backend: Backend) -> anyhow::Result<Self> {
        let kube = Cluster::start(
            backend,
            AuthConfig {
                cluster_name: CLUSTER.to_owned(),
                secret_access_key: Some(nth_tests::TEST_SECRET_KEY.to_owned()),
            },
            Behaviour {
                spare_node: Some(SPARE.to_owned()),
                ..Behaviour::default()
            },
        )
        .await?;
        let mut node = fixtures::node(NODE, INSTANCE, ZONE);
        node["status"]["nodeInfo"] = node_info("boot-1");
        kube.add_node(node).await?;
        kube.add_node(fixtures::node(SPARE, "i-0ffffffffffffffff", "us-east-1b"))
            .await?;
        kube.add_pod(fixtures::daemonset_pod("kube-system", "aws-node", NODE))
            .await?;
        let mut agent_pod = fixtures::replicaset_pod("nth", "nth-agent", 0, NODE, "x");
        agent_pod["metadata"]["labels"] = json!({"app.kubernetes.io/name": "nth-agent"});
        kube.add_pod(agent_pod).await?;
        for i in 0..4 {
            kube.add_pod(fixtures::replicaset_pod(
                "shop",
                "web-5d9f7",
                i,
                NODE,
                "web",
            ))
            .await?;
        }
        let imds = ImdsEmulator::start(INSTANCE, ZONE).await?;
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kube.agent_kubeconfig(CLUSTER)?.to_string())?;
        Ok(Self {
            kube,
            imds,
            _dir: dir,
            kubeconfig,
            metrics_port: nth_tests::free_port()?,
        })
    }

    fn env(&self, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let metrics = format!("127.0.0.1:{}", self.metrics_port);
        let mut env: BTreeMap<String, String> = [
            ("NODE_NAME", NODE),
            ("IMDS_ENDPOINT", self.imds.url.as_str()),
            ("POLL_INTERVAL", POLL),
            ("REBOOT_CHECK_INTERVAL", "300ms"),
            ("METRICS_ADDR", metrics.as_str()),
            ("EVICTION_RETRY_SECONDS", "1"),
            ("LOG_LEVEL", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    fn agent(&self, extra: &[(&str, &str)]) -> anyhow::Result<Process> {
        Process::spawn(
            "nth-agent",
            &["--kubeconfig".as_ref(), self.kubeconfig.as_os_str()],
            &self.env(extra),
        )
    }

    async fn node(&self) -> anyhow::Result<Value> {
        Ok(self.kube.node(NODE).await?.unwrap_or_default())
    }

    /// Polls the node until `check` holds, failing with the agent's log if it never does.
    async fn node_when(
        &self,
        agent: &Process,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            let node = self.node().await?;
            if check(&node) {
                return Ok(node);
            }
            if start.elapsed() >= PATIENCE {
                panic!(
                    "timed out waiting for {what}; node: {node:#}\nagent output:\n{}",
                    agent.output_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// PATCHes of the node the emulator served; `None` on the real server, which keeps no
    /// request records.
    fn node_patches(&self) -> Option<usize> {
        let emu = self.kube.emulator()?;
        Some(
            emu.requests()
                .iter()
                .filter(|r| {
                    r.method == "PATCH" && r.uri.starts_with(&format!("/api/v1/nodes/{NODE}"))
                })
                .count(),
        )
    }

    async fn app_pods_left(&self) -> anyhow::Result<usize> {
        Ok(self
            .kube
            .pods_on(NODE)
            .await?
            .iter()
            .filter(|p| p["metadata"]["namespace"] == "shop")
            .count())
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.metrics_port, "/metrics").await
    }
}

fn node_info(boot: &str) -> Value {
    json!({
        "bootID": boot, "machineID": "ec2", "systemUUID": "ec2", "kernelVersion": "6.1",
        "osImage": "Amazon Linux 2023", "containerRuntimeVersion": "containerd://1.7",
        "kubeletVersion": "v1.33.0", "kubeProxyVersion": "v1.33.0",
        "operatingSystem": "linux", "architecture": "amd64",
    })
}

/// Waits until `check` holds, failing with the agent's log if it never does.
async fn eventually(agent: &Process, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "timed out waiting for {what}; agent output:\n{}",
        agent.output_text()
    );
}

async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

fn annotation(node: &Value, suffix: &str) -> Option<String> {
    node["metadata"]["annotations"][format!("{PREFIX}/{suffix}")]
        .as_str()
        .map(str::to_owned)
}

fn cordoned(node: &Value) -> bool {
    node["spec"]["unschedulable"] == true
}

fn kept(node: &Value) -> anyhow::Result<()> {
    foreign_marks_kept(node).map_err(anyhow::Error::msg)
}

/// No taint or annotation of nth's left on the node.
fn no_marks_of_ours(node: &Value) {
    assert!(our_taint_keys(node, PREFIX).is_empty(), "{node:#}");
    let ours: Vec<&String> = node["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(&format!("{PREFIX}/")))
        .collect();
    assert!(ours.is_empty(), "annotations of ours left: {ours:?}");
}

fn maintenance(code: &str, state: &str, id: &str) -> Value {
    let not_before = Utc::now() + TimeDelta::hours(2);
    json!([{
        "NotBefore": not_before.format("%-d %b %Y %H:%M:%S GMT").to_string(),
        "NotAfter": (not_before + TimeDelta::minutes(15)).format("%-d %b %Y %H:%M:%S GMT").to_string(),
        "Code": code,
        "Description": "scheduled reboot",
        "EventId": id,
        "State": state,
    }])
}

/// The kubelet's report of a new boot: what the agent takes for the end of the reboot.
async fn reboot(world: &World) -> anyhow::Result<()> {
    world
        .kube
        .patch_node_status(NODE, json!({"status": {"nodeInfo": {"bootID": "boot-2"}}}))
        .await
}

on_both_backends! {
    async fn spot_notice_cordons_taints_and_drains_once_by_the_notices_deadline(
        backend: Backend
    ) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        let agent = world.agent(&[])?;
        eventually(&agent, "the agent's first poll", || {
            world
                .imds
                .requests()
                .iter()
                .any(|r| r.path.ends_with("instance-action"))
        })
        .await;
        assert!(!cordoned(&world.node().await?), "no notice, no cordon");

        let end = Utc::now() + TimeDelta::seconds(40);
        world.imds.set_spot(Some(json!({
            "action": "terminate",
            "time": end.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        })));
        let node = world
            .node_when(&agent, "the node drained", |n| {
                annotation(n, "drained-event-id").is_some()
            })
            .await?;

        assert!(cordoned(&node));
        assert!(
            taint_keys(&node).contains(&format!("{PREFIX}/spot-itn")),
            "{node}"
        );
        kept(&node)?;
        let id = annotation(&node, "event-id").unwrap_or_default();
        assert!(id.starts_with(&format!("imds-spot-{INSTANCE}-")), "{id}");
        assert_eq!(
            annotation(&node, "interruption-kind").as_deref(),
            Some("spot-interruption")
        );
        assert_eq!(world.app_pods_left().await?, 0, "application pods evicted");
        let left = world.kube.pods_on(NODE).await?;
        assert!(
            left.iter()
                .any(|p| p["metadata"]["labels"]["app.kubernetes.io/name"] == "nth-agent"),
            "the agent's own pod stays"
        );
        // Pods (30 s of grace) must stop 15 s before the instance goes, 40 s after the notice.
        let graces: Vec<Option<i64>> = world.kube.terminations().into_iter().map(|t| t.1).collect();
        assert_eq!(graces.len(), 4, "{graces:?}");
        assert!(
            graces.iter().all(|g| g.is_some_and(|g| g <= 25)),
            "grace clipped to the notice's deadline: {graces:?}"
        );

        // The notice stays in IMDS and is seen on every poll: nothing more happens.
        let patches = world.node_patches();
        if let Some(patches) = patches {
            assert_eq!(patches, 2, "one PATCH to mark, one to record the drain");
        }
        let polls_before = world.imds.requests().len();
        eventually(&agent, "ten more polls", || {
            world.imds.requests().len() >= polls_before + 40
        })
        .await;
        assert_eq!(
            world.node().await?["metadata"]["resourceVersion"],
            node["metadata"]["resourceVersion"],
            "the same notice is handled once: the node is not written again"
        );
        assert_eq!(world.node_patches(), patches);
        assert_eq!(world.kube.terminations().len(), 4, "no pod evicted twice");

        let metrics = world.metrics().await?;
        assert!(
            metrics.contains(
                "nth_agent_actions_total{kind=\"spot-interruption\",outcome=\"drained\"} 1"
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("nth_agent_errors_total{source=\"imds\"} 0"),
            "{metrics}"
        );
        let last_poll: i64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("nth_agent_last_successful_poll_timestamp_seconds "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_default();
        assert!((Utc::now().timestamp() - last_poll).abs() <= 5, "{metrics}");
        let health = http_get(world.metrics_port, "/healthz").await?;
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
            "{health}"
        );

        // Every log line is JSON naming the node; the notice's lines name the notice.
        let records = agent.log_records();
        assert!(!records.is_empty());
        for r in &records {
            assert!(
                r.to_string().contains(NODE),
                "a log line without the node: {r}"
            );
        }
        assert!(records
            .iter()
            .any(|r| r["message"] == "notice handled" && r.to_string().contains(&id)));
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn rebalance_recommendation_taints_and_cordons_only(backend: Backend) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        let agent = world.agent(&[])?;
        world
            .imds
            .set_rebalance(Some(json!({"noticeTime": "2026-11-02T13:58:40Z"})));
        let node = world.node_when(&agent, "the node cordoned", cordoned).await?;
        assert!(taint_keys(&node).contains(&format!("{PREFIX}/rebalance-recommendation")));
        kept(&node)?;
        eventually(&agent, "the outcome counted", || {
            agent.output_text().contains("\"outcome\":\"marked\"")
        })
        .await;
        assert_eq!(world.app_pods_left().await?, 4, "nothing evicted");
        assert!(world.kube.terminations().is_empty(), "nothing evicted");
        let metrics = world.metrics().await?;
        assert!(
            metrics.contains(
                "nth_agent_actions_total{kind=\"rebalance-recommendation\",outcome=\"marked\"} 1"
            ),
            "{metrics}"
        );
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn scheduled_reboot_drains_then_uncordons_once_the_node_has_rebooted(
        backend: Backend
    ) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        let agent = world.agent(&[])?;
        let event_id = "instance-event-0d59937288b749b32";
        world
            .imds
            .set_scheduled(maintenance("system-reboot", "active", event_id));
        let node = world
            .node_when(&agent, "the node drained", |n| {
                annotation(n, "drained-event-id").is_some()
            })
            .await?;
        assert!(cordoned(&node));
        assert!(taint_keys(&node).contains(&format!("{PREFIX}/scheduled-maintenance")));
        kept(&node)?;
        let record: Value = serde_json::from_str(
            &annotation(&node, "restore-after-maintenance").unwrap_or_default(),
        )?;
        assert_eq!(record["eventId"], event_id);
        assert_eq!(record["bootId"], "boot-1");
        assert_eq!(world.app_pods_left().await?, 0);

        // Still the same boot: the node stays cordoned however long the agent watches.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(cordoned(&world.node().await?));

        // The reboot: the kubelet reports a new boot ID.
        reboot(&world).await?;
        // Uncordoned, then the record dropped, then counted and logged.
        eventually(&agent, "the restore done", || {
            agent.output_text().contains("maintenance restore done")
        })
        .await;
        let node = world.node().await?;
        assert!(!cordoned(&node), "{node}");
        no_marks_of_ours(&node);
        kept(&node)?;
        let metrics = world.metrics().await?;
        assert!(
            metrics.contains(
                "nth_agent_actions_total{kind=\"scheduled-maintenance\",outcome=\"uncordoned\"} 1"
            ),
            "{metrics}"
        );
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn a_restarted_agent_uncordons_after_the_reboot(backend: Backend) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        let agent = world.agent(&[])?;
        let event_id = "instance-event-restart";
        world
            .imds
            .set_scheduled(maintenance("instance-reboot", "active", event_id));
        let node = world
            .node_when(&agent, "the node drained", |n| {
                annotation(n, "drained-event-id").is_some()
            })
            .await?;
        kept(&node)?;
        agent.stop().await;

        // The reboot restarts the agent with the node; IMDS no longer lists the event.
        world.imds.set_scheduled(json!([]));
        reboot(&world).await?;
        let agent = world.agent(&[])?;
        eventually(&agent, "the restore done", || {
            agent.output_text().contains("maintenance restore done")
        })
        .await;
        let node = world.node().await?;
        assert!(!cordoned(&node), "{node:#}");
        no_marks_of_ours(&node);
        kept(&node)?;
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn a_cancelled_maintenance_event_uncordons(backend: Backend) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        let agent = world.agent(&[])?;
        let event_id = "instance-event-cancelled";
        world
            .imds
            .set_scheduled(maintenance("instance-reboot", "active", event_id));
        let node = world.node_when(&agent, "the node cordoned", cordoned).await?;
        kept(&node)?;
        world
            .imds
            .set_scheduled(maintenance("instance-reboot", "canceled", event_id));
        let node = world
            .node_when(&agent, "the node uncordoned", |n| {
                !cordoned(n) && annotation(n, "restore-after-maintenance").is_none()
            })
            .await?;
        // The restore may land in more than one write: wait for the last of our marks to go.
        let node = if our_taint_keys(&node, PREFIX).is_empty() {
            node
        } else {
            world
                .node_when(&agent, "nth's taints removed", |n| {
                    our_taint_keys(n, PREFIX).is_empty()
                })
                .await?
        };
        no_marks_of_ours(&node);
        kept(&node)?;
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn a_node_cordoned_by_someone_else_is_never_uncordoned(
        backend: Backend
    ) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        world
            .kube
            .patch_node(NODE, json!({"spec": {"unschedulable": true}}))
            .await?;
        let before = world.node().await?;
        let agent = world.agent(&[])?;

        // A cancelled event the agent never acted on: nothing to take back.
        world.imds.set_scheduled(maintenance(
            "system-reboot",
            "canceled",
            "instance-event-other",
        ));
        let polls = world.imds.requests().len();
        eventually(&agent, "some polls", || {
            world.imds.requests().len() >= polls + 20
        })
        .await;
        assert_eq!(world.node().await?, before, "the node is not written");
        if let Some(patches) = world.node_patches() {
            assert_eq!(patches, 0);
        }

        // An event the agent acts on, then cancelled: its taint goes, the other cordon stays.
        let event_id = "instance-event-ours";
        world
            .imds
            .set_scheduled(maintenance("system-reboot", "active", event_id));
        let node = world
            .node_when(&agent, "the node tainted", |n| {
                taint_keys(n).contains(&format!("{PREFIX}/scheduled-maintenance"))
            })
            .await?;
        kept(&node)?;
        world
            .imds
            .set_scheduled(maintenance("system-reboot", "canceled", event_id));
        let node = world
            .node_when(&agent, "nth's marks removed", |n| {
                our_taint_keys(n, PREFIX).is_empty()
                    && annotation(n, "restore-after-maintenance").is_none()
            })
            .await?;
        assert!(cordoned(&node), "someone else's cordon stays");
        no_marks_of_ours(&node);
        kept(&node)?;
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn imds_errors_and_hangs_do_not_stop_the_agent(backend: Backend) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        world.imds.set_fault(Fault::ServerError);
        let agent = world.agent(&[])?;
        let end = Utc::now() + TimeDelta::seconds(90);
        world.imds.set_spot(Some(json!({
            "action": "terminate",
            "time": end.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        })));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            agent.is_running(),
            "500s do not crash the agent:\n{}",
            agent.output_text()
        );
        world.imds.set_fault(Fault::Hang);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            agent.is_running(),
            "hangs do not crash the agent:\n{}",
            agent.output_text()
        );
        assert!(!cordoned(&world.node().await?));
        let metrics = world.metrics().await?;
        assert!(
            !metrics.contains("nth_agent_errors_total{source=\"imds\"} 0"),
            "errors counted: {metrics}"
        );

        world.imds.set_fault(Fault::None);
        let node = world
            .node_when(&agent, "the node drained once IMDS is back", |n| {
                annotation(n, "drained-event-id").is_some()
            })
            .await?;
        kept(&node)?;
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn imdsv2_tokens_are_refreshed_and_refetched_after_expiry(
        backend: Backend
    ) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        // A 1-second token: replaced before it runs out, poll after poll.
        let short = world.agent(&[("IMDS_TOKEN_TTL_SECONDS", "1")])?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(world.imds.tokens_issued() >= 3, "tokens are refreshed");
        let metrics = world.metrics().await?;
        assert!(
            metrics.contains("nth_agent_errors_total{source=\"imds\"} 0"),
            "{metrics}"
        );
        short.stop().await;

        // A 6-hour token that IMDS forgets (a restart): 401, a new token, carry on.
        let before = world.imds.requests().len();
        let agent = world.agent(&[])?;
        eventually(&agent, "the new agent's first polls", || {
            world
                .imds
                .requests()
                .iter()
                .skip(before)
                .filter(|r| r.path.ends_with("instance-action") && r.status == 404)
                .count()
                >= 2
        })
        .await;
        let issued = world.imds.tokens_issued();
        let seen = world.imds.requests().len();
        world.imds.expire_tokens();
        world
            .imds
            .set_rebalance(Some(json!({"noticeTime": "2026-11-02T13:58:40Z"})));
        let node = world.node_when(&agent, "the node cordoned", cordoned).await?;
        kept(&node)?;
        let after: Vec<_> = world.imds.requests().into_iter().skip(seen).collect();
        assert!(after.iter().any(|r| r.status == 401), "the expiry was seen");
        assert_eq!(world.imds.tokens_issued(), issued + 1, "one new token");
        assert!(
            world
                .imds
                .requests()
                .iter()
                .filter(|r| r.method == "GET")
                .all(|r| r.token.is_some()),
            "every metadata read carries a token"
        );
        let metrics = world.metrics().await?;
        assert!(
            metrics.contains("nth_agent_errors_total{source=\"imds\"} 0"),
            "a 401 answered with a new token is not an error: {metrics}"
        );
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn imdsv1_is_used_only_when_allowed(backend: Backend) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        // IMDSv2 unusable (the token request's reply never comes), IMDSv1 answering.
        world.imds.require_token(false);
        world.imds.set_token_fault(Fault::Hang);
        world
            .imds
            .set_rebalance(Some(json!({"noticeTime": "2026-11-02T13:58:40Z"})));

        let strict = world.agent(&[])?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(strict.is_running(), "{}", strict.output_text());
        assert!(!cordoned(&world.node().await?), "no IMDSv1 unless allowed");
        assert!(
            world.imds.requests().iter().all(|r| r.method == "PUT"),
            "without a token the agent reads nothing"
        );
        strict.stop().await;

        let agent = world.agent(&[("IMDS_V1_FALLBACK", "true")])?;
        let node = world
            .node_when(&agent, "the node cordoned over IMDSv1", cordoned)
            .await?;
        kept(&node)?;
        assert!(world
            .imds
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.token.is_none() && r.status == 200));
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn dry_run_writes_nothing(backend: Backend) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        let before = world.node().await?;
        let agent = world.agent(&[("DRY_RUN", "true")])?;
        world.imds.set_spot(Some(json!({
            "action": "terminate",
            "time": (Utc::now() + TimeDelta::seconds(120)).format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        })));
        world
            .imds
            .set_scheduled(maintenance("system-reboot", "active", "instance-event-dry"));
        eventually(&agent, "both notices handled", || {
            agent
                .output_text()
                .matches("\"outcome\":\"dry-run\"")
                .count()
                >= 2
        })
        .await;
        if let Some(emu) = world.kube.emulator() {
            let writes = emu.writes();
            assert!(writes.is_empty(), "a dry run writes nothing: {writes:?}");
        }
        assert_eq!(world.node().await?, before);
        assert_eq!(world.app_pods_left().await?, 4);
        assert!(world.kube.terminations().is_empty(), "nothing evicted");
        let events = world.kube.event_reasons(NODE).await?;
        assert!(events.is_empty(), "no Events in a dry run: {events:?}");
        agent.stop().await;
        Ok(())
    }
}

on_both_backends! {
    async fn a_node_of_another_instance_is_refused(backend: Backend) -> anyhow::Result<()> {
        let world = World::start(backend).await?;
        let spare_before = world.kube.node(SPARE).await?;
        let agent = world.agent(&[("NODE_NAME", SPARE)])?;
        let start = Instant::now();
        while agent.is_running() && start.elapsed() < PATIENCE {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !agent.is_running(),
            "the agent must refuse another instance's node"
        );
        assert!(
            agent.output_text().contains("not this instance"),
            "{}",
            agent.output_text()
        );
        assert_eq!(world.kube.node(SPARE).await?, spare_before, "the node is not written");
        if let Some(patches) = world.node_patches() {
            assert_eq!(patches, 0);
        }
        Ok(())
    }
}
