//! The Lambda's configuration, from environment variables (see the README's reference).

use std::path::PathBuf;
use std::time::Duration;

use std::collections::HashMap;

use nth_core::notify::{Format, DEFAULT_TEMPLATE};
use nth_core::policy::DEFAULT_PREFIX;
use nth_core::{Disruption, DrainSettings, InterruptionKind, Policy, Response, TaintEffect};

/// The tag that marks an instance (or its Auto Scaling group) as one nth may act on, as
/// aws-node-termination-handler's queue mode checks `aws-node-termination-handler/managed`.
pub const DEFAULT_MANAGED_TAG: &str = "node-termination-handler/managed";

/// Between two lifecycle heartbeats while draining: well inside the shortest heartbeat
/// timeout a hook can have worth draining under (Auto Scaling allows 30 s; EKS guides use
/// 300 s or more), and cheap (one small call).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
    /// The EKS cluster this function serves; instances tagged for another are left alone.
    pub cluster_name: String,
    pub access: ClusterAccess,
    pub policy: Policy,
    pub drain: DrainSettings,
    /// Act only on instances (or groups) with this tag; `None` when the check is off.
    pub managed_tag: Option<String>,
    pub heartbeat_interval: Duration,
    /// CloudWatch namespace of the EMF metrics; `None` (no metrics line) outside Lambda.
    pub metrics_namespace: Option<String>,
    pub webhook: Option<WebhookConfig>,
}

/// Where the webhook URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookUrl {
    /// WEBHOOK_URL, given directly.
    Plain(String),
    /// WEBHOOK_URL_SECRET_ARN: read from Secrets Manager when the container starts.
    Secret(String),
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: WebhookUrl,
    pub headers: Vec<(String, String)>,
    pub format: Format,
    pub template: String,
}

fn webhook(get: &impl Fn(&str) -> Option<String>) -> Result<Option<WebhookConfig>, ConfigError> {
    let url = match (get("WEBHOOK_URL"), get("WEBHOOK_URL_SECRET_ARN")) {
        (Some(url), _) => WebhookUrl::Plain(url),
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
        let cluster_name = required(
            &get,
            "CLUSTER_NAME",
            "the EKS cluster whose nodes this function drains",
        )?;
        let access = match kubeconfig {
            Some(path) => ClusterAccess::Kubeconfig(path),
            None => {
                let endpoint = required(&get, "CLUSTER_ENDPOINT", "the cluster's API server URL")?;
                if !endpoint.starts_with("https://") {
                    return Err(ConfigError::Invalid {
                        name: "CLUSTER_ENDPOINT",
                        value: endpoint,
                        why: "must be an https:// URL (the token is a credential)".into(),
                    });
                }
                ClusterAccess::Eks {
                    endpoint,
                    ca_data: required(
                        &get,
                        "CLUSTER_CA_DATA",
                        "the cluster's certificate authority (base64 PEM)",
                    )?,
                }
            }
        };
        let policy = policy_from_lookup(&get)?;
        let dry_run = policy.dry_run;
        let exclude_pod_labels = match get("EXCLUDE_POD_LABELS") {
            Some(value) => value
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                        .ok_or_else(|| ConfigError::Invalid {
                            name: "EXCLUDE_POD_LABELS",
                            value: value.clone(),
                            why: format!("{pair:?} is not key=value"),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let defaults = DrainSettings::default();
        let drain = DrainSettings {
            concurrency: number(&get, "DRAIN_CONCURRENCY")?
                .map(|n: usize| n.max(1))
                .unwrap_or(defaults.concurrency),
            eviction_retry_interval: number(&get, "EVICTION_RETRY_SECONDS")?
                .map(Duration::from_secs)
                .unwrap_or(defaults.eviction_retry_interval),
            grace_period_override: number(&get, "POD_TERMINATION_GRACE_PERIOD")?,
            evict_emptydir: flag_or(&get, "DRAIN_EMPTYDIR_PODS", true)?,
            evict_unmanaged: flag_or(&get, "DRAIN_UNMANAGED_PODS", true)?,
            exclude_namespaces: get("EXCLUDE_NAMESPACES")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            exclude_pod_labels,
            dry_run,
            ..defaults
        };
        let managed_tag = flag_or(&get, "CHECK_MANAGED_TAG", true)?
            .then(|| get("MANAGED_TAG").unwrap_or_else(|| DEFAULT_MANAGED_TAG.to_owned()));
        let heartbeat_interval = number(&get, "LIFECYCLE_HEARTBEAT_SECONDS")?
            .map(|s: u64| Duration::from_secs(s.max(1)))
            .unwrap_or(DEFAULT_HEARTBEAT);
        Ok(Self {
            cluster_name,
            access,
            policy,
            drain,
            managed_tag,
            heartbeat_interval,
            webhook: webhook(&get)?,
            metrics_namespace: Some(
                get("METRICS_NAMESPACE")
                    .unwrap_or_else(|| crate::metrics::DEFAULT_NAMESPACE.to_owned()),
            ),
        })
    }
}

/// The policy alone: all that `nth-lambda explain` needs, with no cluster settings.
pub fn policy_from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Policy, ConfigError> {
    Ok(Policy {
        prefix: get("TAINT_PREFIX").unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
        taint_effect: match get("TAINT_EFFECT") {
            Some(value) => value.parse().map_err(|why| ConfigError::Invalid {
                name: "TAINT_EFFECT",
                value,
                why,
            })?,
            None => TaintEffect::default(),
        },
        dry_run: flag(get, "DRY_RUN")?,
        overrides: overrides(get)?,
        exclude_from_load_balancers: flag(get, "EXCLUDE_FROM_LOAD_BALANCERS")?,
        out_of_service_taint: flag(get, "OUT_OF_SERVICE_TAINT")?,
    })
}

/// ACTIONS=`kind=response,...` (e.g. `rebalance-recommendation=taint+cordon+drain,
/// instance-stopping=ignore`), with REBALANCE_DRAIN=true as a shortcut for the first.
fn overrides(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<HashMap<InterruptionKind, Response>, ConfigError> {
    let mut map = HashMap::new();
    if flag(get, "REBALANCE_DRAIN")? {
        map.insert(
            InterruptionKind::RebalanceRecommendation,
            Response::Disrupt(Disruption::FULL),
        );
    }
    let Some(value) = get("ACTIONS") else {
        return Ok(map);
    };
    let invalid = |why: String| ConfigError::Invalid {
        name: "ACTIONS",
        value: value.clone(),
        why,
    };
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (kind, response) = entry
            .split_once('=')
            .ok_or_else(|| invalid(format!("{entry:?} is not kind=action")))?;
        let kind: InterruptionKind = kind.trim().parse().map_err(invalid)?;
        let response: Response = response.trim().parse().map_err(invalid)?;
        map.insert(kind, response);
    }
    Ok(map)
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

fn flag(get: &impl Fn(&str) -> Option<String>, name: &'static str) -> Result<bool, ConfigError> {
    flag_or(get, name, false)
}

fn flag_or(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(name).as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(other) => Err(ConfigError::Invalid {
            name,
            value: other.to_owned(),
            why: "expected true or false".into(),
        }),
    }
}

fn number<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    get(name)
        .map(|value| {
            value.parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                value,
                why: e.to_string(),
            })
        })
        .transpose()
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
        assert_eq!(c.policy.taint_effect, TaintEffect::NoSchedule);
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
    fn managed_tag_check_is_on_by_default_and_can_be_turned_off() {
        let c = config(&CLUSTER).expect("valid");
        assert_eq!(c.managed_tag.as_deref(), Some(DEFAULT_MANAGED_TAG));
        let mut vars = CLUSTER.to_vec();
        vars.push(("CHECK_MANAGED_TAG", "false"));
        assert_eq!(config(&vars).expect("valid").managed_tag, None);
    }

    #[test]
    fn actions_override_the_defaults_and_name_bad_entries() {
        let mut vars = CLUSTER.to_vec();
        vars.push((
            "ACTIONS",
            "instance-stopping=ignore, scheduled-maintenance=taint+cordon",
        ));
        vars.push(("REBALANCE_DRAIN", "true"));
        let c = config(&vars).expect("valid");
        assert_eq!(
            c.policy.overrides[&InterruptionKind::InstanceStopping],
            Response::Ignore
        );
        assert_eq!(
            c.policy.overrides[&InterruptionKind::RebalanceRecommendation],
            Response::Disrupt(Disruption::FULL)
        );
        let mut vars = CLUSTER.to_vec();
        vars.push(("ACTIONS", "spot=drain"));
        let err = config(&vars).expect_err("unknown kind").to_string();
        assert!(err.contains("ACTIONS") && err.contains("spot"), "{err}");
    }

    #[test]
    fn drain_selection_settings_parse() {
        let mut vars = CLUSTER.to_vec();
        vars.push(("EXCLUDE_NAMESPACES", "nth, kube-system"));
        vars.push(("EXCLUDE_POD_LABELS", "app=nth-agent"));
        vars.push(("DRAIN_EMPTYDIR_PODS", "false"));
        let c = config(&vars).expect("valid");
        assert_eq!(
            c.drain.exclude_namespaces,
            vec!["nth".to_owned(), "kube-system".to_owned()]
        );
        assert_eq!(
            c.drain.exclude_pod_labels,
            vec![("app".to_owned(), "nth-agent".to_owned())]
        );
        assert!(!c.drain.evict_emptydir && c.drain.evict_unmanaged);
        let mut vars = CLUSTER.to_vec();
        vars.push(("EXCLUDE_POD_LABELS", "app"));
        assert!(config(&vars)
            .expect_err("bad pair")
            .to_string()
            .contains("EXCLUDE_POD_LABELS"));
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
    fn dry_run_reaches_policy_and_drain() {
        let mut vars = CLUSTER.to_vec();
        vars.push(("DRY_RUN", "true"));
        vars.push(("TAINT_PREFIX", "aws-node-termination-handler"));
        let c = config(&vars).expect("valid");
        assert!(c.policy.dry_run && c.drain.dry_run);
        assert_eq!(c.policy.prefix, "aws-node-termination-handler");
    }
}
