//! The README's first command: a Spot interruption through the real `nth-lambda` binary on
//! emulated AWS (moto) and Kubernetes, showing the nodes and pods before and after.

use anyhow::Context;
use nth_tests::kube::state::{is_ready, is_terminating};
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{Sandbox, APP_NAMESPACE, PDB_NAME, SPARE_NODE};
use serde_json::Value;

fn print_cluster(sandbox: &Sandbox, title: &str) {
    println!("\n== {title}");
    for node in [sandbox.node_name(), SPARE_NODE] {
        let Some(n) = sandbox.emulator().node(node) else {
            continue;
        };
        let cordoned = n
            .pointer("/spec/unschedulable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let taints: Vec<String> = n
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{}:{}",
                    t["key"].as_str().unwrap_or_default(),
                    t["effect"].as_str().unwrap_or_default()
                )
            })
            .collect();
        println!(
            "node {node}  {}  taints: {}",
            if cordoned {
                "SchedulingDisabled"
            } else {
                "Schedulable"
            },
            if taints.is_empty() {
                "none".to_owned()
            } else {
                taints.join(", ")
            }
        );
        let mut pods = sandbox.emulator().pods_on(node);
        pods.sort_by_key(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        });
        for pod in pods {
            let state = if is_terminating(&pod) {
                "Terminating"
            } else if is_ready(&pod) {
                "Ready"
            } else {
                "NotReady"
            };
            println!(
                "    {:<12} {:<44} {state}",
                pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                pod["metadata"]["name"].as_str().unwrap_or_default(),
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("starting moto, the Kubernetes API emulator and nth-lambda under the Runtime API emulator...");
    let sandbox = Sandbox::start(&[]).await.context("starting the sandbox")?;
    println!(
        "instance {} ({}) is node {}",
        sandbox.instance.id,
        sandbox.instance.availability_zone,
        sandbox.node_name()
    );
    print_cluster(&sandbox, "before");

    let event = sandbox.spot_event("1e5527d7-bb36-4607-3370-4164db56a40e");
    println!(
        "\n== EventBridge delivers\n{}",
        serde_json::to_string_pretty(&event)?
    );
    let outcome = sandbox.invoke(event).await?;

    println!("\n== nth-lambda's log (JSON lines)");
    for line in sandbox.lambda.output() {
        println!("{line}");
    }
    println!("\n== invocation result");
    match &outcome {
        Outcome::Response(v) => println!("{}", serde_json::to_string_pretty(v)?),
        Outcome::Error {
            error_type,
            message,
        } => println!("ERROR {error_type}: {message}"),
    }
    print_cluster(&sandbox, "after");

    println!(
        "\n== Events on node {} (as kubectl describe node shows them)",
        sandbox.node_name()
    );
    let events = sandbox.emulator().world(|w| w.events.clone());
    for event in events
        .iter()
        .filter(|e| e["involvedObject"]["name"] == sandbox.node_name())
    {
        println!(
            "    {:<8} {:<20} {}",
            event["type"].as_str().unwrap_or_default(),
            event["reason"].as_str().unwrap_or_default(),
            event["message"].as_str().unwrap_or_default()
        );
    }

    let min_healthy = sandbox.emulator().world(|w| {
        w.record
            .pdb_min_healthy
            .get(&(APP_NAMESPACE.to_owned(), PDB_NAME.to_owned()))
            .copied()
    });
    let (accepted, refused) = sandbox
        .emulator()
        .world(|w| (w.record.evictions_accepted, w.record.evictions_refused));
    println!(
        "\nPodDisruptionBudget {APP_NAMESPACE}/{PDB_NAME} (maxUnavailable 1 of 2): lowest healthy count {}",
        min_healthy.map_or("-".to_owned(), |n| n.to_string())
    );
    println!(
        "API server: {} requests, {accepted} evictions accepted, {refused} refused by the PDB, {} bad tokens",
        sandbox.emulator().requests().len(),
        sandbox.emulator().auth_failures().len()
    );
    if matches!(outcome, Outcome::Error { .. }) {
        anyhow::bail!("the invocation failed");
    }
    Ok(())
}
