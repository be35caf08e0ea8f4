//! A mass interruption: hundreds of nodes of 20 pods interrupted at once and handled
//! concurrently in one process (the engine nth-core, as the Lambda and the agent use it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use nth_core::drain::DrainDeadline;
use nth_core::{DrainSettings, Drainer, Interruption, InterruptionKind, NodeMarker, Policy};
use nth_tests::fixtures;
use nth_tests::kube::{client, AuthConfig, Behaviour, KubeApi};

use crate::table::Table;

const PODS_PER_NODE: usize = 20;

pub async fn measure(table: &mut Table, nodes: usize) -> anyhow::Result<()> {
    let api = KubeApi::start(
        AuthConfig {
            cluster_name: "bench".into(),
            secret_access_key: None,
        },
        Behaviour {
            pod_stop_delay: Duration::ZERO,
            spare_node: None,
            ..Behaviour::default()
        },
    )
    .await?;
    api.world(|w| {
        for n in 0..nodes {
            let node = format!("ip-10-2-{}-{}.ec2.internal", n / 250, n % 250);
            w.add_node(fixtures::node(&node, &format!("i-{n:017x}"), "us-east-1a"));
            for p in 0..PODS_PER_NODE {
                let mut pod = fixtures::replicaset_pod("apps", &format!("rs{n}"), p, &node, "mass");
                pod["spec"]["terminationGracePeriodSeconds"] = serde_json::json!(0);
                w.add_pod(pod);
            }
        }
    });
    let client = client(&api, "bench")?;
    let marker = NodeMarker::new(client.clone(), Policy::default());
    let drainer = Drainer::new(client, DrainSettings::default());
    let cordoned: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let started = Instant::now();
    let deadline = DrainDeadline {
        pods_stopped_by: Some(Utc::now() + TimeDelta::seconds(105)),
        give_up_at: Utc::now() + TimeDelta::seconds(120),
    };
    // Every node is cordoned before any is drained, as nth does with the instances of one
    // event: pods evicted from the first nodes must not land on the next ones.
    let names: Vec<String> = (0..nodes)
        .map(|n| format!("ip-10-2-{}-{}.ec2.internal", n / 250, n % 250))
        .collect();
    let marks = names.iter().enumerate().map(|(n, name)| {
        let (marker, cordoned) = (&marker, Arc::clone(&cordoned));
        async move {
            let interruption = Interruption {
                id: format!("mass-{n}"),
                kind: InterruptionKind::SpotInterruption,
                instance_id: format!("i-{n:017x}"),
                event_time: Utc::now(),
                deadline: Some(Utc::now() + TimeDelta::seconds(120)),
                detail: "terminate".into(),
                lifecycle: None,
            };
            let node = marker
                .get(name)
                .await?
                .ok_or_else(|| anyhow::anyhow!("node {name} missing"))?;
            let taint = Policy::default().taint_key(InterruptionKind::SpotInterruption);
            marker
                .mark(&node, &interruption, Some(&taint), true, true)
                .await?;
            cordoned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(started.elapsed());
            anyhow::Ok(())
        }
    });
    for marked in futures::future::join_all(marks).await {
        marked?;
    }
    let drains = names.iter().map(|name| {
        let drainer = &drainer;
        async move {
            let report = drainer.drain(name, deadline).await?;
            anyhow::Ok((report.complete, started.elapsed()))
        }
    });
    let results = futures::future::join_all(drains).await;
    let mut drained = Duration::ZERO;
    let mut complete = 0;
    for result in results {
        let (done, at) = result?;
        complete += usize::from(done);
        drained = drained.max(at);
    }
    let last_cordon = cordoned
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .copied()
        .max()
        .unwrap_or_default();
    table.row(
        &format!("mass interruption: {nodes} nodes x {PODS_PER_NODE} pods, one process"),
        "all cordoned <= 1 s, all drained <= 10 s",
        format!(
            "all cordoned at {:.2} s, all drained at {:.2} s ({complete}/{nodes} complete), {} requests",
            last_cordon.as_secs_f64(),
            drained.as_secs_f64(),
            api.requests().len()
        ),
        Some(complete == nodes && last_cordon.as_secs_f64() <= 1.0 && drained.as_secs_f64() <= 10.0),
    );
    Ok(())
}
