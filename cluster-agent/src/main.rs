//! `nth-agent`: the optional in-cluster companion of the nth Lambda. It runs on every node
//! (a DaemonSet), watches its own instance's metadata for what only IMDS shows, and cordons
//! and drains its own node with the same core the Lambda uses.

mod agent;
mod config;
mod imds;
mod metrics;
mod notices;
mod reboot;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use nth_core::{Drainer, NodeEvents, NodeMarker};
use tracing::{info, info_span, Instrument};
use tracing_subscriber::EnvFilter;

use crate::agent::Agent;
use crate::config::Config;
use crate::imds::Imds;
use crate::metrics::Metrics;
use crate::reboot::RebootRecords;

/// No single API call of the agent's (GET or PATCH of its node, a LIST of its pods, one
/// eviction) should take longer; a hung connection must not eat a two-minute Spot notice.
const KUBE_TIMEOUT: Duration = Duration::from_secs(20);

// One thread is plenty for a poll every few seconds and a drain's handful of requests in
// flight, and keeps the idle footprint to a single stack.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("--help" | "-h")) {
        println!("{}", config::USAGE);
        return Ok(());
    }
    if matches!(args.first().map(String::as_str), Some("--version" | "-V")) {
        println!("nth-agent {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    init_logging();
    let config = Config::from_args(&args, config::env_lookup).context("reading configuration")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics server to {}", config.metrics_addr))?;
    tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));

    let span = info_span!("agent", node = %config.node_name);
    async move {
        let client = kube_client(&config).await?;
        let imds = Imds::new(
            &config.imds_endpoint,
            config.token_ttl_seconds,
            config.imds_v1_fallback,
        );
        let identity = agent::identity(&imds, config.poll_interval, &metrics).await;
        info!(
            instance_id = %identity.instance_id,
            zone = %identity.zone,
            dry_run = config.policy.dry_run,
            poll_interval_ms = u64::try_from(config.poll_interval.as_millis()).unwrap_or(u64::MAX),
            "nth-agent started"
        );
        let agent = Arc::new(Agent {
            node_name: config.node_name.clone(),
            identity,
            imds,
            marker: NodeMarker::new(client.clone(), config.policy.clone()),
            events: NodeEvents::new(client.clone(), config.policy.dry_run),
            records: RebootRecords::new(client.clone(), &config.policy),
            drainer: Drainer::new(client, config.drain.clone()),
            policy: config.policy.clone(),
            metrics,
            poll_interval: config.poll_interval,
            reboot_check_interval: config.reboot_check_interval,
            max_drain: config.max_drain,
            handled: Mutex::default(),
            pending: Mutex::default(),
        });
        agent.start().await.context("checking this node")?;
        agent.run().await;
        Ok(())
    }
    .instrument(span)
    .await
}

/// The in-cluster service account, or a kubeconfig when one is given. kube's own 429 retry is
/// off, as in the Lambda: the drain paces PodDisruptionBudget refusals itself.
async fn kube_client(config: &Config) -> anyhow::Result<kube::Client> {
    let mut kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("no kubeconfig given and not running in a pod with a service account")?,
    };
    kube_config.default_retry = false;
    kube_config.read_timeout = Some(KUBE_TIMEOUT);
    kube_config.connect_timeout = Some(KUBE_TIMEOUT);
    kube::Client::try_from(kube_config).context("building the Kubernetes client")
}

/// JSON logs, one object per line, carrying every enclosing span's fields, so each line
/// names the node and, while one is handled, the notice. Level from LOG_LEVEL (default info).
fn init_logging() {
    let filter =
        EnvFilter::try_new(std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".to_owned()))
            .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true)
        .with_env_filter(filter)
        .init();
}
