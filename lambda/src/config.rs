//! The Lambda's configuration, from environment variables (see the README's reference).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use nth_core::notify::{Format, DEFAULT_TEMPLATE};
use nth_core::settings::{self, SettingError};
use nth_core::{DrainSettings, Policy};

use crate::clusters::Served;

/// The tag that marks an instance (or its Auto Scaling group) as one nth may act on, as
/// aws-node-termination-handler's queue mode checks `aws-node-termination-handler/managed`.
pub const DEFAULT_MANAGED_TAG: &str = "node-termination-handler/managed";

/// Between two lifecycle heartbeats while draining: well inside the shortest heartbeat
/// timeout a hook can have worth draining under (Auto Scaling allows 30 s; EKS guides use
/// 300 s or more), and cheap (one small call).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

/// How long one node's drain may go on across invocations. An hour is Auto Scaling's default
/// lifecycle hook timeout and far beyond any healthy drain; a PodDisruptionBudget that holds a
/// node longer is stuck, and the instance is let go (CONTINUE) rather than kept forever.
const DEFAULT_MAX_DRAIN: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("environment variable {name} is required: {why}")]
    Missing {
        name: &'static str,
        why: &'static str,
    },
    #[error("environment variable {name}={value:?} is invalid: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: String,
    },
}

/// How to reach the cluster's API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterAccess {
    /// The EKS endpoint, authenticated with the function's IAM role.
    Eks {
        /// `https://...` as `aws eks describe-cluster` shows it.
        endpoint: String,
        /// The cluster's CA bundle, base64 of PEM, as EKS gives it (`certificateAuthority.data`).
        ca_data: String,
    },
    /// A kubeconfig file, for `nth-lambda replay --kubeconfig` outside Lambda.
    Kubeconfig(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The EKS clusters this function serves; instances of any other are left alone.
    pub clusters: Served,
    /// How to reach the one cluster; `None` to look each cluster up with eks:DescribeCluster.
    pub access: Option<ClusterAccess>,
    pub policy: Policy,
    pub drain: DrainSettings,
    /// Act only on instances (or groups) with this tag; `None` when the check is off.
    pub managed_tag: Option<String>,
    /// Leave nodes Karpenter manages to Karpenter's own interruption handling
    /// (LEAVE_KARPENTER_NODES).
    pub leave_karpenter_nodes: bool,
    pub heartbeat_interval: Duration,
    /// After a termination hook's drain, before CompleteLifecycleAction: time for load
    /// balancers to deregister the instance (LIFECYCLE_COMPLETION_DELAY_SECONDS).
    pub completion_delay: Duration,
    /// How long one node's drain may go on across invocations (MAX_DRAIN_SECONDS).
    pub max_drain: Duration,
    /// CloudWatch namespace of the EMF metrics; `None` (no metrics line) outside Lambda.
    pub metrics_namespace: Option<String>,
    pub webhook: Option<WebhookConfig>,
}

/// Where the webhook URL comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum WebhookUrl {
    /// WEBHOOK_URL, given directly.
    Plain(String),
    /// WEBHOOK_URL_SECRET_ARN: read from Secrets Manager when the container starts.
    Secret(String),
}

/// Never the URL itself: for Slack, Teams and Chime the URL is the credential. The secret's
/// ARN names it without giving it away.
impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(url) => f
                .debug_tuple("Plain")
                .field(&nth_core::notify::RedactedUrl(url))
                .finish(),
            Self::Secret(arn) => f.debug_tuple("Secret").field(arn).finish(),
        }
    }
}

#[derive(Clone)]
pub struct WebhookConfig {
    pub url: WebhookUrl,
    pub headers: Vec<(String, String)>,
    pub format: Format,
    pub template: String,
    /// WEBHOOK_ALLOW_HTTP: accept an `http://` URL (a receiver inside the VPC, a test rig).
    /// Off, only `https://` is accepted, from the environment or from the secret.
    pub allow_http: bool,
}

/// Header names only: their values may be credentials (an `Authorization` header).
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("headers", &nth_core::notify::RedactedHeaders(&self.headers))
            .field("format", &self.format)
            .field("template", &self.template)
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// WEBHOOK_ALLOW_HTTP, read where the URL is checked: here for WEBHOOK_URL, and by
/// [`crate::secret`] for a URL from Secrets Manager.
pub fn webhook_allow_http(get: &impl Fn(&str) -> Option<String>) -> Result<bool, ConfigError> {
    match get("WEBHOOK_ALLOW_HTTP") {
        None => Ok(false),
        Some(value) => match value.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" | "" => Ok(false),
            _ => Err(ConfigError::Invalid {
                name: "WEBHOOK_ALLOW_HTTP",
                value,
                why: "expected true or false".into(),
            }),
        },
    }
}

/// Why `url` may not be a webhook URL, if it may not: only `https://` (or `http://` when
/// allowed), with a host. The message never repeats the URL.
pub fn webhook_url_problem(url: &str, allow_http: bool) -> Option<String> {
    let Ok(uri) = url.trim().parse::<http::Uri>() else {
        return Some("not a URL".into());
    };
    if uri.host().is_none_or(str::is_empty) {
        return Some("the URL has no host".into());
    }
    match uri.scheme_str() {
        Some("https") => None,
        Some("http") if allow_http => None,
        Some("http") => Some(
            "http:// sends the notice (and a URL that is a credential) in clear text: use https://, or set WEBHOOK_ALLOW_HTTP=true for a receiver inside your network".into(),
        ),
        _ => Some("the URL must start with https://".into()),
    }
}

fn webhook(get: &impl Fn(&str) -> Option<String>) -> Result<Option<WebhookConfig>, ConfigError> {
    let allow_http = webhook_allow_http(get)?;
    let url = match (get("WEBHOOK_URL"), get("WEBHOOK_URL_SECRET_ARN")) {
        (Some(url), _) => {
            if let Some(why) = webhook_url_problem(&url, allow_http) {
                return Err(ConfigError::Invalid {
                    name: "WEBHOOK_URL",
                    value: "(hidden: the URL is a credential)".into(),
                    why,
                });
            }
            WebhookUrl::Plain(url)
        }
        (None, Some(arn)) => WebhookUrl::Secret(arn),
        (None, None) => return Ok(None),
    };
    let headers = match get("WEBHOOK_HEADERS") {
        Some(value) => {
            let parsed: HashMap<String, String> =
                serde_json::from_str(&value).map_err(|e| ConfigError::Invalid {
                    name: "WEBHOOK_HEADERS",
                    value: "(hidden: may hold a credential)".into(),
                    why: format!("expected a JSON object of strings: {e}"),
                })?;
            parsed.into_iter().collect()
        }
        None => Vec::new(),
    };
    let format = match get("WEBHOOK_FORMAT") {
        Some(value) => value.parse().map_err(|why| ConfigError::Invalid {
            name: "WEBHOOK_FORMAT",
            value,
            why,
        })?,
        None => Format::Json,
    };
    Ok(Some(WebhookConfig {
        url,
        headers,
        format,
        template: get("WEBHOOK_TEMPLATE").unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned()),
        allow_http,
    }))
}

impl Config {
    /// The process environment; `kubeconfig` replaces the EKS endpoint settings.
    pub fn from_env(kubeconfig: Option<PathBuf>) -> Result<Self, ConfigError> {
        Self::from_lookup(env_lookup, kubeconfig)
    }

    /// Reads settings through `get`, so tests need not touch the process environment.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        kubeconfig: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let clusters = served(&get)?;
        let one_cluster = matches!(clusters, Served::One(_));
        let access = match (kubeconfig, get("CLUSTER_ENDPOINT")) {
            (Some(_), _) if !one_cluster => {
                return Err(ConfigError::Invalid {
                    name: "CLUSTERS",
                    value: get("CLUSTERS").unwrap_or_default(),
                    why: "a kubeconfig reaches one cluster: set CLUSTER_NAME instead".into(),
                })
            }
            (Some(path), _) => Some(ClusterAccess::Kubeconfig(path)),
            (None, Some(endpoint)) if !one_cluster => {
                return Err(ConfigError::Invalid {
                    name: "CLUSTER_ENDPOINT",
                    value: endpoint,
                    why: "with CLUSTERS, each cluster's endpoint comes from eks:DescribeCluster"
                        .into(),
                })
            }
            (None, Some(endpoint)) if !endpoint.starts_with("https://") => {
                return Err(ConfigError::Invalid {
                    name: "CLUSTER_ENDPOINT",
                    value: endpoint,
                    why: "must be an https:// URL (the token is a credential)".into(),
                })
            }
            (None, Some(endpoint)) => Some(ClusterAccess::Eks {
                endpoint,
                ca_data: required(
                    &get,
                    "CLUSTER_CA_DATA",
                    "with CLUSTER_ENDPOINT, the cluster's certificate authority (base64 PEM)",
                )?,
            }),
            // Looked up with eks:DescribeCluster when first needed.
            (None, None) => None,
        };
        let policy = policy_from_lookup(&get)?;
        let drain = settings::drain(&get, policy.dry_run, "")?;
        let managed_tag = settings::flag(&get, "CHECK_MANAGED_TAG", true)?
            .then(|| get("MANAGED_TAG").unwrap_or_else(|| DEFAULT_MANAGED_TAG.to_owned()));
        let heartbeat_interval = settings::number(&get, "LIFECYCLE_HEARTBEAT_SECONDS")?
            .map(|s: u64| Duration::from_secs(s.max(1)))
            .unwrap_or(DEFAULT_HEARTBEAT);
        Ok(Self {
            clusters,
            access,
            policy,
            drain,
            managed_tag,
            leave_karpenter_nodes: settings::flag(&get, "LEAVE_KARPENTER_NODES", false)?,
            heartbeat_interval,
            completion_delay: Duration::from_secs(
                settings::number(&get, "LIFECYCLE_COMPLETION_DELAY_SECONDS")?.unwrap_or(0),
            ),
            max_drain: settings::number(&get, "MAX_DRAIN_SECONDS")?
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_MAX_DRAIN),
            webhook: webhook(&get)?,
            metrics_namespace: Some(
                get("METRICS_NAMESPACE")
                    .unwrap_or_else(|| crate::metrics::DEFAULT_NAMESPACE.to_owned()),
            ),
        })
    }
}

/// CLUSTER_NAME, or CLUSTERS: a comma-separated list of names, or `*`.
fn served(get: &impl Fn(&str) -> Option<String>) -> Result<Served, ConfigError> {
    let Some(list) = get("CLUSTERS") else {
        return Ok(Served::One(required(
            get,
            "CLUSTER_NAME",
            "the EKS cluster whose nodes this function drains (or CLUSTERS for several)",
        )?));
    };
    let invalid = |why: &str| ConfigError::Invalid {
        name: "CLUSTERS",
        value: list.clone(),
        why: why.to_owned(),
    };
    if get("CLUSTER_NAME").is_some() {
        return Err(invalid("set CLUSTER_NAME or CLUSTERS, not both"));
    }
    let names: BTreeSet<String> = list
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.contains("*") {
        return if names.len() == 1 {
            Ok(Served::Any)
        } else {
            Err(invalid("`*` serves every cluster and stands alone"))
        };
    }
    if names.is_empty() {
        return Err(invalid("expected cluster names separated by commas, or *"));
    }
    Ok(Served::Listed(names))
}

/// The policy alone: all that `nth-lambda explain` needs, with no cluster settings.
pub fn policy_from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Policy, ConfigError> {
    Ok(settings::policy(get)?)
}

/// The process environment, with empty variables treated as unset (as SAM and Terraform
/// leave optional parameters).
pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn required(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    why: &'static str,
) -> Result<String, ConfigError> {
    get(name).ok_or(ConfigError::Missing { name, why })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned(), None)
    }

    const CLUSTER: [(&str, &str); 3] = [
        ("CLUSTER_NAME", "prod"),
        (
            "CLUSTER_ENDPOINT",
            "https://ABC.gr7.us-east-1.eks.amazonaws.com",
        ),
        ("CLUSTER_CA_DATA", "LS0tLS1CRUdJTg=="),
    ];

    #[test]
    fn defaults_are_what_the_readme_says() {
        let c = config(&CLUSTER).expect("valid");
        assert_eq!(c.policy.prefix, "node-termination-handler");
        assert_eq!(c.policy.taint_effect, nth_core::TaintEffect::NoSchedule);
        assert!(!c.policy.dry_run);
        assert_eq!(c.drain.concurrency, nth_core::drain::DEFAULT_CONCURRENCY);
    }

    #[test]
    fn missing_cluster_name_says_which_variable() {
        let err = config(&CLUSTER[1..]).expect_err("must fail");
        assert!(err.to_string().contains("CLUSTER_NAME"), "{err}");
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        let mut vars = CLUSTER.to_vec();
        vars.push(("DRY_RUN", "maybe"));
        let err = config(&vars).expect_err("must fail");
        assert!(err.to_string().contains("DRY_RUN") && err.to_string().contains("maybe"));
        let mut vars = CLUSTER.to_vec();
        vars.push(("TAINT_EFFECT", "NoWay"));
        assert!(config(&vars)
            .expect_err("must fail")
            .to_string()
            .contains("TAINT_EFFECT"));
        let mut vars = CLUSTER.to_vec();
        vars[1] = ("CLUSTER_ENDPOINT", "http://plain");
        assert!(config(&vars).is_err());
    }

    #[test]
    fn clusters_come_from_describe_cluster_unless_the_endpoint_is_given() {
        let c = config(&CLUSTER).expect("valid");
        assert_eq!(c.clusters, Served::One("prod".into()));
        assert!(matches!(c.access, Some(ClusterAccess::Eks { .. })));
        assert_eq!(config(&CLUSTER[..1]).expect("valid").access, None);
        let c = config(&[("CLUSTERS", " blue, green ,")]).expect("valid");
        assert_eq!(
            c.clusters,
            Served::Listed(["blue".to_owned(), "green".to_owned()].into())
        );
        assert_eq!(c.access, None);
        assert_eq!(
            config(&[("CLUSTERS", "*")]).expect("valid").clusters,
            Served::Any
        );
    }

    #[test]
    fn contradictory_cluster_settings_are_refused_by_name() {
        for (vars, named) in [
            (
                vec![("CLUSTERS", "blue"), ("CLUSTER_NAME", "prod")],
                "CLUSTERS",
            ),
            (vec![("CLUSTERS", "*,blue")], "CLUSTERS"),
            (vec![("CLUSTERS", " , ")], "CLUSTERS"),
            (
                vec![("CLUSTERS", "blue"), ("CLUSTER_ENDPOINT", "https://x")],
                "CLUSTER_ENDPOINT",
            ),
            (
                vec![("CLUSTER_NAME", "prod"), ("CLUSTER_ENDPOINT", "https://x")],
                "CLUSTER_CA_DATA",
            ),
        ] {
            let err = config(&vars).expect_err("contradictory").to_string();
            assert!(err.contains(named), "{vars:?}: {err}");
        }
    }

    #[test]
    fn managed_tag_check_is_on_by_default_and_can_be_turned_off() {
        let c = config(&CLUSTER).expect("valid");
        assert_eq!(c.managed_tag.as_deref(), Some(DEFAULT_MANAGED_TAG));
        let mut vars = CLUSTER.to_vec();
        vars.push(("CHECK_MANAGED_TAG", "false"));
        assert_eq!(config(&vars).expect("valid").managed_tag, None);
    }

    #[test]
    fn webhook_settings_parse_and_hide_header_values_in_errors() {
        let mut vars = CLUSTER.to_vec();
        vars.push((
            "WEBHOOK_URL_SECRET_ARN",
            "arn:aws:secretsmanager:us-east-1:1:secret:hook",
        ));
        vars.push(("WEBHOOK_FORMAT", "slack"));
        let c = config(&vars).expect("valid");
        let hook = c.webhook.expect("configured");
        assert_eq!(hook.format, Format::Slack);
        assert!(matches!(hook.url, WebhookUrl::Secret(_)));
        let mut vars = CLUSTER.to_vec();
        vars.push(("WEBHOOK_URL", "https://hooks.example/x"));
        vars.push(("WEBHOOK_HEADERS", "Authorization: Bearer s3cr3t"));
        let err = config(&vars).expect_err("not JSON").to_string();
        assert!(
            err.contains("WEBHOOK_HEADERS") && !err.contains("s3cr3t"),
            "{err}"
        );
    }

    #[test]
    fn webhook_urls_are_https_unless_http_is_allowed() {
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut vars = CLUSTER.to_vec();
            vars.extend_from_slice(extra);
            config(&vars)
        };
        let err = with(&[("WEBHOOK_URL", "http://hooks.example/T0/B0/XXXXSECRET")])
            .expect_err("http refused")
            .to_string();
        assert!(
            err.contains("WEBHOOK_URL") && err.contains("https") && !err.contains("XXXXSECRET"),
            "{err}"
        );
        for bad in ["ftp://hooks.example/x", "hooks.example/x", "https://"] {
            let err = with(&[("WEBHOOK_URL", bad)]).expect_err(bad).to_string();
            assert!(err.contains("WEBHOOK_URL"), "{bad}: {err}");
        }
        let ok = with(&[("WEBHOOK_URL", "https://hooks.example/x")]).expect("https");
        assert!(!ok.webhook.expect("configured").allow_http);
        let allowed = with(&[
            ("WEBHOOK_URL", "http://10.0.0.5:8080/hook"),
            ("WEBHOOK_ALLOW_HTTP", "true"),
        ])
        .expect("http allowed");
        assert!(allowed.webhook.expect("configured").allow_http);
        assert!(with(&[
            ("WEBHOOK_URL", "https://hooks.example/x"),
            ("WEBHOOK_ALLOW_HTTP", "yes please"),
        ])
        .is_err());
    }

    #[test]
    fn debug_output_never_shows_the_webhook_url_or_header_values() {
        let mut vars = CLUSTER.to_vec();
        vars.push((
            "WEBHOOK_URL",
            "https://hooks.slack.com/services/T0/B0/XXXXSECRETPATH?token=XXXXSECRETQUERY",
        ));
        vars.push((
            "WEBHOOK_HEADERS",
            r#"{"Authorization": "Bearer XXXXSECRETTOKEN"}"#,
        ));
        let c = config(&vars).expect("valid");
        for shown in [
            format!("{c:?}"),
            format!("{c:#?}"),
            format!("{:?}", c.webhook),
            format!("{:?}", c.webhook.as_ref().map(|w| &w.url)),
        ] {
            assert!(!shown.contains("XXXXSECRET"), "{shown}");
            assert!(!shown.contains("/services/"), "{shown}");
        }
        let shown = format!("{c:?}");
        assert!(
            shown.contains("hooks.slack.com") && shown.contains("Authorization"),
            "the host and the header's name still help: {shown}"
        );
        let secret = WebhookUrl::Secret("arn:aws:secretsmanager:us-east-1:1:secret:hook".into());
        assert!(
            format!("{secret:?}").contains("secret:hook"),
            "an ARN is no secret"
        );
    }

    #[test]
    fn dry_run_reaches_policy_and_drain() {
        let mut vars = CLUSTER.to_vec();
        vars.push(("DRY_RUN", "true"));
        vars.push(("TAINT_PREFIX", "aws-node-termination-handler"));
        let c = config(&vars).expect("valid");
        assert!(c.policy.dry_run && c.drain.dry_run);
        assert_eq!(c.policy.prefix, "aws-node-termination-handler");
    }
}
