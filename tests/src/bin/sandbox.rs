//! The README's first command: a Spot interruption through the real `nth-lambda` binary on
//! emulated AWS (moto) and Kubernetes, showing the nodes and pods before and after. With
//! `--real`, Kubernetes is a real control plane from `KUBEBUILDER_ASSETS` instead.

use anyhow::Context;
use nth_tests::cluster::Backend;
use nth_tests::fixtures::foreign_marks_kept;
use nth_tests::kube::state::{is_ready, is_terminating};
use nth_tests::runtime_api::Outcome;
use nth_tests::sandbox::{sandbox_behaviour, Sandbox, APP_NAMESPACE, PDB_NAME, SPARE_NODE};
use serde_json::Value;

async fn print_cluster(sandbox: &Sandbox, title: &str) -> anyhow::Result<()> {
    println!("\n== {title}");
    for node in [sandbox.node_name(), SPARE_NODE] {
        let Some(n) = sandbox.kube.node(node).await? else {
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
        let mut pods = sandbox.kube.pods_on(node).await?;
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
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let backend = if std::env::args().any(|a| a == "--real") {
        if !Backend::real_available()? {
            anyhow::bail!("--real needs KUBEBUILDER_ASSETS: a folder with etcd, kube-apiserver and kube-controller-manager (setup-envtest)");
        }
        println!("starting moto, a real Kubernetes control plane (KUBEBUILDER_ASSETS) and nth-lambda under the Runtime API emulator...");
        Backend::Real
    } else {
        println!("starting moto, the Kubernetes API emulator and nth-lambda under the Runtime API emulator...");
        Backend::Emulator
    };
    let sandbox = Sandbox::start_on(backend, &[], sandbox_behaviour())
        .await
        .context("starting the sandbox")?;
    println!(
        "instance {} ({}) is node {}",
        sandbox.instance.id,
        sandbox.instance.availability_zone,
        sandbox.node_name()
    );
    print_cluster(&sandbox, "before").await?;

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
    print_cluster(&sandbox, "after").await?;
    let node = sandbox
        .kube
        .node(sandbox.node_name())
        .await?
        .unwrap_or_default();
    match foreign_marks_kept(&node) {
        Ok(()) => println!(
            "\nother owners' taints (dedicated, nvidia.com/gpu), label and annotation: kept"
        ),
        Err(lost) => println!("\nLOST: {lost}"),
    }

    println!(
        "\n== Events on node {} (as kubectl describe node shows them)",
        sandbox.node_name()
    );
    for event in sandbox.kube.events_about(sandbox.node_name()).await? {
        println!(
            "    {:<8} {:<20} {}",
            event["type"].as_str().unwrap_or_default(),
            event["reason"].as_str().unwrap_or_default(),
            event["message"].as_str().unwrap_or_default()
        );
    }

    println!(
        "\nPodDisruptionBudget {APP_NAMESPACE}/{PDB_NAME} (maxUnavailable 1 of 2): lowest healthy count {}",
        sandbox
            .kube
            .pdb_min_healthy(APP_NAMESPACE, PDB_NAME)
            .map_or("-".to_owned(), |n| n.to_string())
    );
    if let Some(emulator) = sandbox.kube.emulator() {
        let (accepted, refused) =
            emulator.world(|w| (w.record.evictions_accepted, w.record.evictions_refused));
        println!(
            "API server: {} requests, {accepted} evictions accepted, {refused} refused by the PDB, {} bad tokens",
            emulator.requests().len(),
            emulator.auth_failures().len()
        );
    }
    if matches!(outcome, Outcome::Error { .. }) {
        anyhow::bail!("the invocation failed");
    }
    Ok(())
}
