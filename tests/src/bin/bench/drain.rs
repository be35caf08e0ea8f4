//! The drain of a 110-pod node, in process against the API emulator: against the emulator's
//! floor (all 110 evictions fired at once), and against kubectl's reference figure.

use std::time::{Duration, Instant};

use chrono::Utc;
use nth_core::drain::DrainDeadline;
use nth_core::{DrainSettings, Drainer};
use nth_tests::fixtures;
use nth_tests::kube::{client, AuthConfig, Behaviour, KubeApi};

use crate::table::Table;

const NODE: &str = "ip-10-0-1-1.ec2.internal";
const PODS: usize = 110;
/// `kubectl drain` 1.32 on a real API server, pods taking 2 s to stop (PERFORMANCE.md).
const KUBECTL_SECONDS: f64 = 24.0;

async fn cluster(pod_stop: Duration) -> anyhow::Result<KubeApi> {
    let api = KubeApi::start(
        AuthConfig {
            cluster_name: "bench".into(),
            secret_access_key: None,
        },
        Behaviour {
            pod_stop_delay: pod_stop,
            spare_node: None,
            ..Behaviour::default()
        },
    )
    .await?;
    api.world(|w| {
        w.add_node(fixtures::node(NODE, "i-0000000000000001a", "us-east-1a"));
        for i in 0..PODS {
            let mut pod = fixtures::replicaset_pod("apps", "batch-9d8", i, NODE, "batch");
            if pod_stop.is_zero() {
                pod["spec"]["terminationGracePeriodSeconds"] = serde_json::json!(0);
            }
            w.add_pod(pod);
        }
    });
    Ok(api)
}

async fn until_empty(api: &KubeApi) {
    while !api.pods_on(NODE).is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Opens the connections a run will use before its clock starts, so that neither side
/// measures TLS handshakes.
async fn warm(client: &kube::Client) {
    let probes = (0..DrainSettings::default().concurrency).map(|_| client.apiserver_version());
    let _ready = futures::future::join_all(probes).await;
}

/// The same evictions with nothing around them (no LIST, no retries, no WATCH), as many
/// at a time as the drain runs, and a busy-wait on the emulator's own state until the pods
/// are gone: the fastest these 110 evictions go on this emulator.
async fn floor() -> anyhow::Result<Duration> {
    use futures::StreamExt;
    let api = cluster(Duration::ZERO).await?;
    let client = client(&api, "bench")?;
    warm(&client).await;
    let started = Instant::now();
    let evictions = (0..PODS).map(|i| {
        let client = client.clone();
        async move {
            let name = format!("batch-9d8-{i:05}");
            let body = serde_json::json!({
                "apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": name, "namespace": "apps"},
                "deleteOptions": {"gracePeriodSeconds": 0},
            });
            let request =
                http::Request::post(format!("/api/v1/namespaces/apps/pods/{name}/eviction"))
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&body).unwrap_or_default())?;
            client.request_text(request).await?;
            anyhow::Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(evictions)
        .buffer_unordered(DrainSettings::default().concurrency)
        .collect()
        .await;
    for result in results {
        result?;
    }
    until_empty(&api).await;
    Ok(started.elapsed())
}

async fn drain(pod_stop: Duration) -> anyhow::Result<(Duration, usize, bool)> {
    let api = cluster(pod_stop).await?;
    let client = client(&api, "bench")?;
    warm(&client).await;
    let drainer = Drainer::new(client, DrainSettings::default());
    let warmup_requests = api.requests().len();
    let started = Instant::now();
    let report = drainer
        .drain(
            NODE,
            DrainDeadline {
                pods_stopped_by: None,
                give_up_at: Utc::now() + chrono::Duration::seconds(120),
            },
        )
        .await?;
    Ok((
        started.elapsed(),
        api.requests().len() - warmup_requests,
        report.complete,
    ))
}

pub async fn measure(table: &mut Table) -> anyhow::Result<()> {
    // Warm up connections and allocators once, then measure.
    floor().await?;
    let mut floors = Vec::new();
    let mut drains = Vec::new();
    let mut requests = 0;
    for _ in 0..5 {
        floors.push(floor().await?.as_secs_f64() * 1000.0);
        let (took, made, complete) = drain(Duration::ZERO).await?;
        anyhow::ensure!(complete, "the drain did not complete");
        drains.push(took.as_secs_f64() * 1000.0);
        requests = made;
    }
    let (floor_ms, _, _) = crate::table::spread(&mut floors);
    let (drain_ms, _, _) = crate::table::spread(&mut drains);
    let ratio = drain_ms / floor_ms;
    table.row(
        "drain of 110 pods, 0 s grace, no PDB (median of 5)",
        "<= 1.5x emulator floor; O(pods) requests",
        format!(
            "{drain_ms:.0} ms vs floor {floor_ms:.0} ms: {ratio:.2}x; {requests} requests ({:.2} per pod)",
            requests as f64 / PODS as f64
        ),
        Some(ratio <= 1.5 && requests <= PODS + 5),
    );

    let (took, made, complete) = drain(Duration::from_secs(2)).await?;
    let speedup = KUBECTL_SECONDS / took.as_secs_f64();
    table.row(
        "drain of 110 pods taking 2 s to stop (kubectl drain: 24 s, 243 requests)",
        ">= 5x faster than kubectl",
        format!(
            "{:.1} s, {made} requests: {speedup:.1}x faster",
            took.as_secs_f64()
        ),
        Some(complete && speedup >= 5.0),
    );
    Ok(())
}
