//! Cold start: from spawning the binary to its first Runtime API `next` request, for
//! nth-lambda and a hello-world lambda_runtime binary, alternated in the same run.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nth_tests::process::workspace_binary;
use nth_tests::runtime_api::RuntimeApi;

use crate::table::{spread, Table};

/// How long a start may take before the run is called broken.
const START_LIMIT: Duration = Duration::from_secs(5);

async fn one_start(binary: &std::path::Path) -> anyhow::Result<Duration> {
    let runtime = RuntimeApi::start().await?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", &runtime.address)
        .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/bench")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_REGION", "us-east-1")
        .env("CLUSTER_NAME", "bench")
        .env("CLUSTER_ENDPOINT", "https://127.0.0.1:1")
        .env("CLUSTER_CA_DATA", "bm90LXVzZWQ=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let first = loop {
        if let Some(at) = runtime.first_next() {
            break at;
        }
        if started.elapsed() > START_LIMIT {
            bail!("{} never asked for an invocation", binary.display());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    child.start_kill()?;
    let _exit = child.wait().await;
    Ok(first.duration_since(started))
}

pub async fn measure(table: &mut Table, runs: usize) -> anyhow::Result<()> {
    let nth = workspace_binary("nth-lambda")?;
    let hello = workspace_binary("hello-lambda")?;
    let (mut ours, mut baseline) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(one_start(&nth).await?.as_secs_f64() * 1000.0);
        baseline.push(one_start(&hello).await?.as_secs_f64() * 1000.0);
    }
    let (ours_median, ours_p10, ours_p90) = spread(&mut ours);
    let (base_median, base_p10, base_p90) = spread(&mut baseline);
    let ratio = ours_median / base_median;
    table.row(
        "cold start, spawn to first `next` (median of alternating runs)",
        "<= 1.5x hello-world",
        format!(
            "{ours_median:.2} ms (p10 {ours_p10:.2}, p90 {ours_p90:.2}) vs hello-world {base_median:.2} ms (p10 {base_p10:.2}, p90 {base_p90:.2}): {ratio:.2}x, {runs} runs each"
        ),
        Some(ratio <= 1.5),
    );
    Ok(())
}
