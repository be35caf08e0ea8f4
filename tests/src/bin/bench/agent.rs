//! The cluster agent's footprint: binary size, idle memory, CPU per IMDS poll, and the time
//! from an IMDS notice to the cordon PATCH.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nth_tests::fixtures;
use nth_tests::imds::ImdsEmulator;
use nth_tests::kube::{kubeconfig, AuthConfig, Behaviour, KubeApi};
use nth_tests::process::workspace_binary;
use serde_json::json;

use crate::table::Table;

const NODE: &str = "ip-10-0-7-21.ec2.internal";
const INSTANCE: &str = "i-0a1b2c3d4e5f60718";
const ZONE: &str = "us-east-1c";
/// The agent's default poll interval.
const POLL: Duration = Duration::from_secs(2);
/// How long the idle agent is watched.
const IDLE: Duration = Duration::from_secs(20);

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} for {pid}"))
}

/// User plus system CPU seconds the process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((ticks(11) + ticks(12)) / TICKS_PER_SECOND)
}

pub async fn measure(table: &mut Table) -> anyhow::Result<()> {
    let binary = workspace_binary("nth-agent")?;
    let size = std::fs::metadata(&binary)?.len() as f64 / (1024.0 * 1024.0);
    table.row(
        "agent release binary",
        "<= 8 MiB",
        format!("{size:.1} MiB"),
        Some(size <= 8.0),
    );

    let kube = KubeApi::start(
        AuthConfig {
            cluster_name: "agent".into(),
            secret_access_key: None,
        },
        Behaviour::default(),
    )
    .await?;
    kube.world(|w| {
        w.add_node(fixtures::node(NODE, INSTANCE, ZONE));
        for i in 0..4 {
            w.add_pod(fixtures::replicaset_pod(
                "shop",
                "web-5d9f7",
                i,
                NODE,
                "web",
            ));
        }
    });
    let imds = ImdsEmulator::start(INSTANCE, ZONE).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("kubeconfig");
    std::fs::write(&config, kubeconfig(&kube, "agent")?.to_string())?;
    let metrics = format!("127.0.0.1:{}", nth_tests::free_port()?);
    let mut child = tokio::process::Command::new(&binary)
        .arg("--kubeconfig")
        .arg(&config)
        .env_clear()
        .env("NODE_NAME", NODE)
        .env("IMDS_ENDPOINT", &imds.url)
        .env("METRICS_ADDR", &metrics)
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("nth-agent exited at once"))?;

    // Idle: let it settle, then watch a stretch of polls.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let polls_before = imds.requests().len();
    let cpu_before = cpu_seconds(pid)?;
    tokio::time::sleep(IDLE).await;
    let cpu = cpu_seconds(pid)? - cpu_before;
    let requests = imds.requests().len() - polls_before;
    let polls = (IDLE.as_secs_f64() / POLL.as_secs_f64()).round();
    let rss = status_kib(pid, "VmRSS:")? / 1024.0;
    table.row(
        "agent idle RSS",
        "<= 10 MiB",
        format!("{rss:.1} MiB"),
        Some(rss <= 10.0),
    );
    let per_poll_ms = cpu * 1000.0 / polls;
    table.row(
        "agent CPU per IMDS poll",
        "<= 1 ms",
        format!(
            "{per_poll_ms:.2} ms ({cpu:.2} s CPU over {polls} polls, {requests} IMDS requests; /proc counts 10 ms ticks)"
        ),
        Some(per_poll_ms <= 1.0),
    );

    // Detection: a Spot notice appears; how long until the node is cordoned?
    let noticed = Instant::now();
    imds.set_spot(Some(json!({"action": "terminate", "time": (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc3339()})));
    let patched = loop {
        if let Some(at) = kube
            .requests()
            .iter()
            .find(|r| r.method == "PATCH" && r.at >= noticed)
            .map(|r| r.at)
        {
            break Some(at);
        }
        if noticed.elapsed() > POLL * 5 {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let _stopped = child.start_kill();
    match patched {
        Some(at) => {
            let latency = at.duration_since(noticed);
            table.row(
                "agent: IMDS notice to cordon PATCH",
                "<= one poll interval (2 s) + one round trip",
                format!("{:.0} ms", latency.as_secs_f64() * 1000.0),
                Some(latency <= POLL + Duration::from_millis(200)),
            );
        }
        None => table.row(
            "agent: IMDS notice to cordon PATCH",
            "<= 2 s + one round trip",
            "no PATCH seen".into(),
            Some(false),
        ),
    }
    Ok(())
}
