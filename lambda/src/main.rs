//! `nth-lambda`: the Lambda runtime loop (no arguments, inside Lambda), and the operator's
//! `explain` and `replay` commands outside it.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use chrono::Utc;
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use nth_lambda::config::{self, Config};
use nth_lambda::handler::{self, Handler, Invocation};
use serde_json::Value;
use tokio::sync::OnceCell;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
usage:
  nth-lambda                       serve the Lambda Runtime API (inside Lambda)
  nth-lambda explain EVENT.json    parse and plan one EventBridge event; touch nothing
  nth-lambda replay EVENT.json [--kubeconfig PATH] [--dry-run]
                                   run the real handler on one event against the AWS
                                   endpoint in the environment and the configured cluster
EVENT.json may be - for standard input. Logs go to standard error, results to standard output.";

/// Replays are not bounded by a Lambda timeout; give them the longest a Lambda may run.
const REPLAY_TIME_LIMIT: chrono::TimeDelta = chrono::TimeDelta::seconds(900);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() => {
            init_logging(false);
            serve().await
        }
        Some("explain") => {
            init_logging(true);
            let [_, path] = args.as_slice() else {
                bail!("explain takes one EVENT.json\n{USAGE}")
            };
            let event = read_event(path)?;
            let policy = config::policy_from_lookup(&config::env_lookup)?;
            let plan = handler::explain(&event, &policy)?;
            println!("{}", serde_json::to_string_pretty(&plan)?);
            Ok(())
        }
        Some("replay") => {
            init_logging(true);
            replay(&args[1..]).await
        }
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("--version" | "-V") => {
            println!("nth-lambda {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => bail!(
            "not inside Lambda (AWS_LAMBDA_RUNTIME_API is unset) and no command given\n{USAGE}"
        ),
    }
}

/// Lambda mode. Only configuration is read before the first `next` request: the AWS and
/// Kubernetes clients are built on the first event, so a cold start costs no more than a
/// bare runtime loop and a warm container reuses them.
async fn serve() -> anyhow::Result<()> {
    let config = Config::from_env(None).context("reading configuration")?;
    let handler: OnceCell<Handler> = OnceCell::new();
    let handler = &handler;
    let config = &config;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let handler = handler
            .get_or_try_init(|| nth_lambda::build_handler(config.clone()))
            .await
            .map_err(|e| diagnostic("SetupFailed", &e))?;
        let invocation = Invocation {
            end: event.context.deadline().into(),
            function_arn: Some(event.context.invoked_function_arn.clone())
                .filter(|arn| !arn.is_empty()),
        };
        let outcome = handler
            .handle(&event.payload, &invocation)
            .await
            .map_err(|e| diagnostic(e.error_type(), &e))?;
        serde_json::to_value(outcome).map_err(|e| diagnostic("SerializeFailed", &e))
    }))
    .await
    .map_err(|e| anyhow::anyhow!("Lambda runtime loop ended: {e}"))
}

fn diagnostic(error_type: &str, error: &dyn std::fmt::Display) -> Diagnostic {
    tracing::error!(error_type, error = %error, "invocation failed");
    Diagnostic {
        error_type: error_type.to_owned(),
        error_message: error.to_string(),
    }
}

async fn replay(args: &[String]) -> anyhow::Result<()> {
    let mut path = None;
    let mut kubeconfig = None;
    let mut dry_run = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--dry-run" => dry_run = true,
            "--kubeconfig" => {
                kubeconfig = Some(PathBuf::from(
                    rest.next().context("--kubeconfig needs a PATH")?,
                ));
            }
            other if path.is_none() && !other.starts_with("--") => path = Some(other.to_owned()),
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let path = path.with_context(|| format!("replay needs EVENT.json\n{USAGE}"))?;
    let event = read_event(&path)?;
    let mut config = Config::from_env(kubeconfig).context("reading configuration")?;
    if dry_run {
        config.policy.dry_run = true;
        config.drain.dry_run = true;
    }
    // Standard output carries the result here, not metrics.
    config.metrics_namespace = None;
    let handler = nth_lambda::build_handler(config).await?;
    let outcome = handler
        .handle(
            &event,
            &Invocation {
                end: Utc::now() + REPLAY_TIME_LIMIT,
                function_arn: None,
            },
        )
        .await?;
    println!("{}", serde_json::to_string_pretty(&outcome)?);
    Ok(())
}

fn read_event(path: &str) -> anyhow::Result<Value> {
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin())
            .context("reading the event from standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))
}

/// JSON logs, one object per line, with the current span's fields (event id, instance,
/// node) on every line. Level from LOG_LEVEL (default info); Lambda captures standard output,
/// the CLI commands keep it for their result.
fn init_logging(to_stderr: bool) {
    let filter =
        EnvFilter::try_new(std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".to_owned()))
            .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        // Every enclosing span, so each line carries the event id, kind, instance, cluster
        // and node of the step it belongs to.
        .with_current_span(false)
        .with_span_list(true)
        .with_env_filter(filter);
    if to_stderr {
        builder.with_writer(std::io::stderr).init();
    } else {
        builder.init();
    }
}
