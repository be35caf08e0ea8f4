//! The real nth-lambda binary under the Runtime API emulator: its size, its peak memory
//! during a 110-pod drain, and the requests it makes from event to cordon.

use std::time::Instant;

use nth_tests::fixtures;
use nth_tests::process::workspace_binary;
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{event, Sandbox, APP_NAMESPACE};
use serde_json::json;

use crate::table::Table;

const MIB: f64 = 1024.0 * 1024.0;

pub fn sizes(table: &mut Table) -> anyhow::Result<()> {
    let binary = workspace_binary("nth-lambda")?;
    let size = std::fs::metadata(&binary)?.len() as f64 / MIB;
    table.row(
        "release binary (stripped)",
        "<= 16 MiB",
        format!("{size:.1} MiB ({})", binary.display()),
        Some(size <= 16.0),
    );
    let zip = nth_tests::workspace_root().join("target/lambda/nth-lambda/bootstrap.zip");
    match std::fs::metadata(&zip) {
        Ok(meta) => {
            let zipped = meta.len() as f64 / MIB;
            table.row(
                "deployment zip (cargo lambda)",
                "<= 6 MiB",
                format!("{zipped:.1} MiB"),
                Some(zipped <= 6.0),
            );
        }
        Err(_) => table.row(
            "deployment zip (cargo lambda)",
            "<= 6 MiB",
            "not built: run scripts/package first".to_owned(),
            None,
        ),
    }
    Ok(())
}

/// Peak resident memory of a process, from /proc (VmHWM).
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM for {pid}"))?;
    Ok(kib / 1024.0)
}

/// Requests from the start of an invocation to its node PATCH, both emulators counted.
fn requests_to_cordon(sandbox: &Sandbox, since: Instant) -> usize {
    let kube = sandbox.emulator().requests();
    let patch_at = kube
        .iter()
        .find(|r| r.at >= since && r.method == "PATCH")
        .map(|r| r.at);
    let Some(patch_at) = patch_at else { return 0 };
    let kube_calls = kube
        .iter()
        .filter(|r| r.at >= since && r.at <= patch_at)
        .count();
    kube_calls + sandbox.aws.actions_since(since).len()
}

async fn invoke_ok(sandbox: &Sandbox, ev: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    match sandbox.invoke(ev).await? {
        Outcome::Response(v) => Ok(v),
        Outcome::Error {
            error_type,
            message,
        } => anyhow::bail!("{error_type}: {message}"),
    }
}

pub async fn measure(table: &mut Table) -> anyhow::Result<()> {
    // Memory while draining 110 pods (8 seeded + 102 more).
    let sandbox = Sandbox::start(&[]).await?;
    let node = sandbox.node_name().to_owned();
    sandbox.emulator().world(|w| {
        for i in 0..102 {
            w.add_pod(fixtures::replicaset_pod(
                APP_NAMESPACE,
                "bulk-7c1",
                i,
                &node,
                "bulk",
            ));
        }
    });
    let pid = sandbox
        .lambda
        .pid()
        .ok_or_else(|| anyhow::anyhow!("nth-lambda exited"))?;
    let result = invoke_ok(&sandbox, sandbox.spot_event("bench-rss")).await?;
    let rss = peak_rss_mib(pid)?;
    let evicted = result["results"][0]["drain"]["evicted"]
        .as_array()
        .map_or(0, Vec::len);
    table.row(
        "peak RSS while draining a 110-pod node",
        "<= 32 MiB",
        format!("{rss:.1} MiB ({evicted} pods evicted)"),
        Some(rss <= 32.0),
    );

    // Round trips from event to cordon: a cold container, then a warm one (same instance).
    let sandbox = Sandbox::start(&[]).await?;
    let id = sandbox.instance.id.clone();
    let cold_start = Instant::now();
    invoke_ok(
        &sandbox,
        event(
            "bench-rb",
            "aws.ec2",
            "EC2 Instance Rebalance Recommendation",
            &id,
            json!({"instance-id": id}),
        ),
    )
    .await?;
    let cold = requests_to_cordon(&sandbox, cold_start);
    let warm_start = Instant::now();
    invoke_ok(&sandbox, sandbox.spot_event("bench-warm")).await?;
    let warm = requests_to_cordon(&sandbox, warm_start);
    table.row(
        "sequential round trips, event to cordon",
        "<= 3 cold, <= 2 warm",
        format!("{cold} cold, {warm} warm"),
        Some(cold <= 3 && warm <= 2 && cold > 0 && warm > 0),
    );

    // Requests per event as the cluster grows: no LIST of all nodes per event.
    let mut per_event = Vec::new();
    for nodes in [10usize, 5000] {
        let sandbox = Sandbox::start(&[]).await?;
        sandbox.emulator().world(|w| {
            for n in 0..nodes.saturating_sub(2) {
                let name = format!("ip-10-1-{}-{}.ec2.internal", n / 250, n % 250);
                w.add_node(fixtures::node(&name, &format!("i-{n:017x}"), "us-east-1c"));
            }
        });
        let since = Instant::now();
        invoke_ok(&sandbox, sandbox.spot_event("bench-scale")).await?;
        let kube = sandbox
            .emulator()
            .requests()
            .iter()
            .filter(|r| r.at >= since)
            .count();
        per_event.push(kube + sandbox.aws.actions_since(since).len());
    }
    let growth = per_event[1].abs_diff(per_event[0]);
    table.row(
        "requests per Spot event (8-pod node), 10-node vs 5,000-node cluster",
        "differ by <= 1",
        format!("{} vs {}", per_event[0], per_event[1]),
        Some(growth <= 1),
    );
    Ok(())
}
