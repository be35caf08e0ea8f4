//! The budget-limited drain of PERFORMANCE.md: 110 pods taking 2 s to stop; a budget of
//! `maxUnavailable: 1` over 5 replicas whose replacements turn Ready 1 s after they start; a
//! budget allowing no eviction over 3. Measured: when the 107 evictable pods are gone, for
//! nth, for the floor the budgets impose (a client trying every refused eviction again every
//! 10 ms: the fastest reaction there is, at a request cost nobody would ship), and for
//! `kubectl drain` on the real control plane when kubectl is on the PATH. On the emulator,
//! and on the real control plane when KUBEBUILDER_ASSETS is set.

use std::time::{Duration, Instant};

use chrono::Utc;
use nth_core::drain::DrainDeadline;
use nth_core::{DrainSettings, Drainer};
use nth_tests::cluster::{Backend, Cluster};
use nth_tests::fixtures;
use nth_tests::kube::{AuthConfig, Behaviour};

use crate::table::Table;

const NODE: &str = "ip-10-0-1-1.ec2.internal";
const SPARE: &str = "ip-10-0-9-9.ec2.internal";
const NS: &str = "apps";
const FREE: usize = 102;
const ONE_AT_A_TIME: usize = 5;
const FROZEN: usize = 3;
const STOP: Duration = Duration::from_secs(2);
const READY_AFTER: Duration = Duration::from_secs(1);
/// Longer than any run needs: the frozen pods hold every drain until it.
const PATIENCE: Duration = Duration::from_secs(90);

async fn scenario(backend: Backend) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start(
        backend,
        AuthConfig {
            cluster_name: "bench".into(),
            secret_access_key: Some(nth_tests::TEST_SECRET_KEY.into()),
        },
        Behaviour {
            pod_stop_delay: STOP,
            replacement_ready_delay: READY_AFTER,
            spare_node: Some(SPARE.to_owned()),
            ..Behaviour::default()
        },
    )
    .await?;
    cluster
        .add_node(fixtures::node(NODE, "i-0000000000000001a", "us-east-1a"))
        .await?;
    cluster
        .add_node(fixtures::node(SPARE, "i-0000000000000009a", "us-east-1a"))
        .await?;
    for (rs, app, n) in [
        ("batch-9d8", "batch", FREE),
        ("db-7f9", "db", ONE_AT_A_TIME),
        ("ledger-5c4", "ledger", FROZEN),
    ] {
        for i in 0..n {
            cluster
                .add_pod(fixtures::replicaset_pod(NS, rs, i, NODE, app))
                .await?;
        }
    }
    cluster
        .add_pdb(fixtures::pdb_max_unavailable(NS, "db", "db", 1))
        .await?;
    cluster
        .add_pdb(fixtures::pdb_max_unavailable(NS, "ledger", "ledger", 0))
        .await?;
    Ok(cluster)
}

/// When only the frozen pods are left on the node, counted from `started`.
async fn evictable_gone(cluster: &Cluster, started: Instant) -> anyhow::Result<Duration> {
    while started.elapsed() < PATIENCE {
        if cluster.pods_on(NODE).await?.len() <= FROZEN {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the evictable pods were not gone within {PATIENCE:?}")
}

async fn nth(backend: Backend) -> anyhow::Result<Duration> {
    let cluster = scenario(backend).await?;
    let drainer = Drainer::new(cluster.client("bench")?, DrainSettings::default());
    let started = Instant::now();
    let deadline = DrainDeadline {
        pods_stopped_by: None,
        give_up_at: Utc::now() + chrono::Duration::from_std(PATIENCE)?,
    };
    let drain = tokio::spawn(async move { drainer.drain(NODE, deadline).await });
    let took = evictable_gone(&cluster, started).await;
    drain.abort();
    took
}

async fn floor(backend: Backend) -> anyhow::Result<Duration> {
    let cluster = scenario(backend).await?;
    let client = cluster.client("bench")?;
    let names: Vec<String> = cluster
        .pods_on(NODE)
        .await?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let started = Instant::now();
    let evictions: Vec<_> = names
        .into_iter()
        .map(|name| {
            let client = client.clone();
            tokio::spawn(async move {
                let body = serde_json::json!({
                    "apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": name, "namespace": NS},
                });
                loop {
                    let request = http::Request::post(format!(
                        "/api/v1/namespaces/{NS}/pods/{name}/eviction"
                    ))
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&body).unwrap_or_default());
                    let Ok(request) = request else { return };
                    if client.request_text(request).await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    let took = evictable_gone(&cluster, started).await;
    evictions.iter().for_each(tokio::task::JoinHandle::abort);
    took
}

/// `kubectl drain` as cluster-admin on the real control plane; `None` without kubectl.
async fn kubectl() -> anyhow::Result<Option<Duration>> {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        return Ok(None);
    }
    let cluster = scenario(Backend::Real).await?;
    let plane = cluster
        .real()
        .ok_or_else(|| anyhow::anyhow!("not the real control plane"))?
        .plane();
    let started = Instant::now();
    let timeout = format!("--timeout={}s", PATIENCE.as_secs());
    let drain = tokio::task::spawn_blocking(move || {
        plane.kubectl(&[
            "drain",
            NODE,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            &timeout,
        ])
    });
    let took = evictable_gone(&cluster, started).await;
    // kubectl waits for the frozen pods until its timeout; the figure is already taken.
    drop(drain);
    took.map(Some)
}

pub async fn measure(table: &mut Table) -> anyhow::Result<()> {
    let mut backends = vec![Backend::Emulator];
    if Backend::real_available()? {
        backends.push(Backend::Real);
    }
    for backend in backends {
        let floor = floor(backend).await?;
        let took = nth(backend).await?;
        let ratio = took.as_secs_f64() / floor.as_secs_f64();
        table.row(
            &format!("budget-limited drain, 107 of 110 pods, {backend:?}"),
            "<= 1.2x the budgets' floor",
            format!(
                "{:.1} s vs floor {:.1} s: {ratio:.2}x",
                took.as_secs_f64(),
                floor.as_secs_f64()
            ),
            Some(ratio <= 1.2),
        );
        if backend == Backend::Real {
            if let Some(reference) = kubectl().await? {
                let speedup = reference.as_secs_f64() / took.as_secs_f64();
                table.row(
                    "budget-limited drain vs kubectl drain, real control plane",
                    ">= 5x faster than kubectl drain",
                    format!(
                        "nth {:.1} s, kubectl {:.1} s: {speedup:.1}x faster",
                        took.as_secs_f64(),
                        reference.as_secs_f64()
                    ),
                    Some(speedup >= 5.0),
                );
            }
        }
    }
    Ok(())
}
