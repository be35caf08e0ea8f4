//! The nth Lambda function: EventBridge events about EC2 instances in, cordoned and drained
//! EKS nodes out.

pub mod budget;
pub mod cluster;
pub mod clusters;
pub mod config;
pub mod continuation;
pub mod eventbridge;
pub mod handler;
pub mod lifecycle;
pub mod metrics;
pub mod resolve;
pub mod secret;
pub mod signed;
pub mod token;
pub mod verify;

use std::sync::Arc;

use aws_config::BehaviorVersion;
use nth_core::{Webhook, WebhookSettings};

use crate::clusters::{Cluster, Clusters, Discovery, Served};
use crate::config::{ClusterAccess, Config, WebhookConfig, WebhookUrl};
use crate::handler::Handler;
use crate::lifecycle::Lifecycle;
use crate::resolve::Resolver;
use crate::token::TokenSource;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no AWS region: set AWS_REGION (Lambda sets it)")]
    NoRegion,
    #[error("no AWS credentials provider: set AWS credentials (Lambda provides the role's)")]
    NoCredentials,
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Secret(#[from] secret::SecretError),
    #[error("building the webhook client: {0}")]
    Webhook(#[source] std::io::Error),
}

/// Builds the AWS and Kubernetes clients. AWS settings come from the environment as every
/// AWS SDK reads them (AWS_REGION, credentials, AWS_ENDPOINT_URL for emulators).
pub async fn build_handler(config: Config) -> Result<Handler, SetupError> {
    // The SDK sets no read timeout by default: an endpoint that stops answering would hold
    // the invocation until Lambda kills it, with no report. Each attempt is bounded instead,
    // and the SDK's retries get a fresh connection.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .operation_attempt_timeout(signed::ATTEMPT_TIMEOUT)
        .operation_timeout(signed::OPERATION_TIMEOUT)
        .build();
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        .load()
        .await;
    let region = aws.region().ok_or(SetupError::NoRegion)?.to_string();
    let credentials = aws
        .credentials_provider()
        .ok_or(SetupError::NoCredentials)?;
    let fixed = match (&config.access, &config.clusters) {
        (Some(access), Served::One(name)) => {
            let client = match access {
                ClusterAccess::Eks { endpoint, ca_data } => {
                    let tokens = Arc::new(TokenSource::new(
                        name.clone(),
                        region.clone(),
                        credentials.clone(),
                    ));
                    cluster::eks_client(endpoint, ca_data, tokens)?
                }
                ClusterAccess::Kubeconfig(path) => cluster::kubeconfig_client(path).await?,
            };
            Some(Cluster::new(
                name.clone(),
                client,
                &config.policy,
                &config.drain,
                false,
            ))
        }
        _ => None,
    };
    let discovery = Discovery {
        aws: aws.clone(),
        credentials,
        region: region.clone(),
        policy: config.policy.clone(),
        drain: config.drain.clone(),
    };
    let asg = aws_sdk_autoscaling::Client::new(&aws);
    // A webhook is a convenience: one that cannot be set up (its secret missing, KMS or IAM
    // refusing, no route to Secrets Manager) must never stop the draining.
    let (webhook, webhook_unavailable) = match config.webhook {
        Some(hook) => match webhook(&aws, hook).await {
            Ok(webhook) => (Some(webhook), None),
            Err(error) => {
                tracing::error!(%error, "webhook unavailable; draining goes on without notices");
                (None, Some(error.to_string()))
            }
        },
        None => (None, None),
    };
    Ok(Handler {
        clusters: Clusters::new(config.clusters, fixed, discovery),
        region,
        managed_tag: config.managed_tag,
        leave_karpenter_nodes: config.leave_karpenter_nodes,
        completion_delay: config.completion_delay,
        resolver: Resolver::new(aws_sdk_ec2::Client::new(&aws), asg.clone()),
        metrics_namespace: config.metrics_namespace,
        webhook,
        webhook_unavailable,
        lifecycle: Lifecycle::new(asg, config.policy.dry_run, config.heartbeat_interval),
        policy: config.policy,
        aws,
        max_drain: chrono::TimeDelta::from_std(config.max_drain).unwrap_or(chrono::TimeDelta::MAX),
    })
}

async fn webhook(aws: &aws_config::SdkConfig, hook: WebhookConfig) -> Result<Webhook, SetupError> {
    let (url, headers) = match hook.url {
        WebhookUrl::Plain(url) => (url, hook.headers),
        WebhookUrl::Secret(arn) => {
            // The secret's headers (credentials, often) override WEBHOOK_HEADERS' of the
            // same name.
            let secret = secret::webhook_secret(aws, &arn).await?;
            let mut headers: Vec<_> = hook
                .headers
                .into_iter()
                .filter(|(name, _)| {
                    !secret
                        .headers
                        .iter()
                        .any(|(theirs, _)| theirs.eq_ignore_ascii_case(name))
                })
                .collect();
            headers.extend(secret.headers);
            (secret.url, headers)
        }
    };
    let settings = WebhookSettings {
        url,
        headers,
        format: hook.format,
        template: hook.template,
        timeout: nth_core::notify::DEFAULT_TIMEOUT,
    };
    Webhook::new(settings).map_err(SetupError::Webhook)
}
