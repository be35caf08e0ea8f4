//! The agent's settings: command-line flags for the cluster connection and dry run, the
//! environment for the rest, with the Lambda's names wherever the two share a setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nth_core::settings::{self, SettingError};
use nth_core::{DrainSettings, Policy};

/// AWS's fixed link-local address for instance metadata.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// A Spot notice gives two minutes; polling every 2 s spends under 2 % of them on detection
/// while costing IMDS (which throttles per instance at a few thousand requests per second)
/// nothing it would notice.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The longest token life IMDS grants (6 hours): fewer token requests, and a token is
/// refreshed well before it runs out anyway.
const DEFAULT_TOKEN_TTL_SECONDS: u64 = 21_600;

/// How often a node waiting to be uncordoned after a maintenance reboot is re-read for its
/// boot ID. Only while one is pending, so the API server sees nothing from an idle agent.
const DEFAULT_REBOOT_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// The drain's limit when a notice gives no end (a rebalance recommendation told to drain, an
/// Auto Scaling termination, maintenance days away): long enough for slow PodDisruptionBudgets,
/// short enough that a stuck drain is reported the same hour.
const DEFAULT_MAX_DRAIN: Duration = Duration::from_secs(600);

/// The port aws-node-termination-handler serves Prometheus metrics on, so scrape configs
/// written for it keep working. Loopback unless told otherwise: with host networking,
/// `0.0.0.0` would serve every address of the node, its VPC address and any public one. The
/// DaemonSet sets the node's own address (`$(HOST_IP):9092`, from `status.hostIP`), where the
/// kubelet's probe and a Prometheus scrape of the pod's IP reach it.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9092";

/// `HOST:PORT`, `[IPv6]:PORT`, or a bare IPv6 address and port (`fd00::1:9092`, as
/// `$(HOST_IP):9092` reads on an IPv6 node).
fn metrics_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    let invalid = |why: String| ConfigError::Invalid {
        name: "METRICS_ADDR",
        value: value.to_owned(),
        why,
    };
    match value.trim().parse::<SocketAddr>() {
        Ok(addr) => Ok(addr),
        Err(error) => {
            let (host, port) = value
                .trim()
                .rsplit_once(':')
                .ok_or_else(|| invalid(format!("{error}: expected HOST:PORT")))?;
            let ip: std::net::IpAddr = host
                .parse()
                .map_err(|_| invalid(format!("{error}: expected an IP address and a port")))?;
            let port: u16 = port
                .parse()
                .map_err(|_| invalid(format!("{error}: expected a port after the last ':'")))?;
            Ok(SocketAddr::new(ip, port))
        }
    }
}

/// The label the DaemonSet gives the agent's pods: they must stay while the node drains, to
/// finish the drain and uncordon after a reboot.
pub const DEFAULT_EXCLUDE_POD_LABELS: &str = "app.kubernetes.io/name=nth-agent";

pub const USAGE: &str = "\
usage: nth-agent [--kubeconfig PATH] [--dry-run]
  --kubeconfig PATH   reach the cluster with this kubeconfig (also KUBECONFIG); without it the
                      in-cluster service account is used
  --dry-run           log every write instead of making it (also DRY_RUN=true)
Everything else comes from the environment; see the README's cluster agent section.";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("environment variable {name} is required: {why}")]
    Missing {
        name: &'static str,
        why: &'static str,
    },
    #[error("{name}={value:?} is invalid: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}\n{USAGE}")]
    Usage(String),
}

#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name, from the downward API (`spec.nodeName`).
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub imds_endpoint: String,
    pub imds_v1_fallback: bool,
    pub token_ttl_seconds: u64,
    pub poll_interval: Duration,
    pub reboot_check_interval: Duration,
    pub max_drain: Duration,
    pub metrics_addr: SocketAddr,
    pub policy: Policy,
    pub drain: DrainSettings,
}

impl Config {
    /// Reads flags from `args` (without the program name) and settings through `get`.
    pub fn from_args(
        args: &[String],
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut kubeconfig = get("KUBECONFIG").map(PathBuf::from);
        let mut dry_run_flag = false;
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--dry-run" => dry_run_flag = true,
                "--kubeconfig" => {
                    let path = rest
                        .next()
                        .ok_or_else(|| ConfigError::Usage("--kubeconfig needs a PATH".into()))?;
                    kubeconfig = Some(PathBuf::from(path));
                }
                other => return Err(ConfigError::Usage(format!("unexpected argument {other:?}"))),
            }
        }
        let mut policy = settings::policy(&get)?;
        policy.dry_run |= dry_run_flag;
        let drain = settings::drain(&get, policy.dry_run, DEFAULT_EXCLUDE_POD_LABELS)?;
        let metrics_addr = get("METRICS_ADDR").unwrap_or_else(|| DEFAULT_METRICS_ADDR.to_owned());
        Ok(Self {
            node_name: get("NODE_NAME").ok_or(ConfigError::Missing {
                name: "NODE_NAME",
                why: "this node's name; the DaemonSet sets it from spec.nodeName",
            })?,
            kubeconfig,
            imds_endpoint: get("IMDS_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_IMDS_ENDPOINT.to_owned())
                .trim_end_matches('/')
                .to_owned(),
            imds_v1_fallback: settings::flag(&get, "IMDS_V1_FALLBACK", false)?,
            token_ttl_seconds: settings::number(&get, "IMDS_TOKEN_TTL_SECONDS")?
                .map(|s: u64| s.clamp(1, DEFAULT_TOKEN_TTL_SECONDS))
                .unwrap_or(DEFAULT_TOKEN_TTL_SECONDS),
            poll_interval: duration(&get, "POLL_INTERVAL")?.unwrap_or(DEFAULT_POLL_INTERVAL),
            reboot_check_interval: duration(&get, "REBOOT_CHECK_INTERVAL")?
                .unwrap_or(DEFAULT_REBOOT_CHECK_INTERVAL),
            max_drain: duration(&get, "MAX_DRAIN")?.unwrap_or(DEFAULT_MAX_DRAIN),
            metrics_addr: self::metrics_addr(&metrics_addr)?,
            policy,
            drain,
        })
    }
}

/// The process environment, with empty variables treated as unset (as manifests leave
/// optional values).
pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `500ms`, `2s`, `10m`, or a bare number of seconds.
fn duration(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<Duration>, ConfigError> {
    let Some(value) = get(name) else {
        return Ok(None);
    };
    let invalid = |why: &str| ConfigError::Invalid {
        name,
        value: value.clone(),
        why: why.to_owned(),
    };
    let v = value.trim();
    let (digits, unit_ms) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000)
    } else {
        (v, 1_000)
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| invalid("expected a duration such as 500ms, 2s or 10m"))?;
    if n == 0 {
        return Err(invalid("must be more than zero"));
    }
    Ok(Some(Duration::from_millis(n.saturating_mul(unit_ms))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nth_core::{Disruption, InterruptionKind, Response, TaintEffect};
    use std::collections::HashMap;

    fn config(args: &[&str], vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Config::from_args(&args, |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_poll_every_two_seconds_and_spare_the_agent_itself() {
        let c = config(&[], &[("NODE_NAME", "n1")]).expect("valid");
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.imds_endpoint, DEFAULT_IMDS_ENDPOINT);
        assert!(!c.imds_v1_fallback && !c.policy.dry_run);
        assert_eq!(
            c.drain.exclude_pod_labels,
            vec![("app.kubernetes.io/name".into(), "nth-agent".into())]
        );
        assert_eq!(c.metrics_addr.port(), 9092);
        assert!(
            c.metrics_addr.ip().is_loopback(),
            "not every address of the node: {}",
            c.metrics_addr
        );
    }

    #[test]
    fn the_metrics_address_is_a_setting_ipv4_or_ipv6() {
        for (value, want) in [
            ("10.0.1.23:9092", "10.0.1.23:9092"),
            ("[fd00::1]:9092", "[fd00::1]:9092"),
            ("fd00::1:9092", "[fd00::1]:9092"),
            ("0.0.0.0:9100", "0.0.0.0:9100"),
        ] {
            let c = config(&[], &[("NODE_NAME", "n1"), ("METRICS_ADDR", value)]).expect(value);
            assert_eq!(c.metrics_addr.to_string(), want, "{value}");
        }
        for value in ["localhost:9092", "10.0.1.23", ":9092", "10.0.1.23:http"] {
            let err = config(&[], &[("NODE_NAME", "n1"), ("METRICS_ADDR", value)])
                .expect_err(value)
                .to_string();
            assert!(err.contains("METRICS_ADDR"), "{value}: {err}");
        }
    }

    #[test]
    fn node_name_is_required() {
        let err = config(&[], &[]).expect_err("must fail").to_string();
        assert!(err.contains("NODE_NAME"), "{err}");
    }

    #[test]
    fn flags_and_lambda_settings_parse() {
        let c = config(
            &["--kubeconfig", "/tmp/k", "--dry-run"],
            &[
                ("NODE_NAME", "n1"),
                ("POLL_INTERVAL", "250ms"),
                ("REBALANCE_DRAIN", "true"),
                ("TAINT_EFFECT", "NoExecute"),
            ],
        )
        .expect("valid");
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/tmp/k")));
        assert!(c.policy.dry_run && c.drain.dry_run);
        assert_eq!(c.poll_interval, Duration::from_millis(250));
        assert_eq!(c.policy.taint_effect, TaintEffect::NoExecute);
        assert_eq!(
            c.policy.overrides[&InterruptionKind::RebalanceRecommendation],
            Response::Disrupt(Disruption::FULL)
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (name, value) in [
            ("POLL_INTERVAL", "soon"),
            ("DRY_RUN", "maybe"),
            ("ACTIONS", "spot=drain"),
        ] {
            let err = config(&[], &[("NODE_NAME", "n1"), (name, value)])
                .expect_err("must fail")
                .to_string();
            assert!(err.contains(name), "{err}");
        }
        assert!(config(&["--bogus"], &[("NODE_NAME", "n1")]).is_err());
    }
}
