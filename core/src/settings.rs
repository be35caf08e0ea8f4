//! The settings the Lambda and the agent share, read under the same names from an
//! environment-like lookup (`get` returns `None` for unset or empty), so that an operator
//! configures both the same way.

use std::collections::HashMap;
use std::time::Duration;

use crate::drain::DrainSettings;
use crate::events::InterruptionKind;
use crate::policy::{Disruption, Policy, Response, TaintEffect, DEFAULT_PREFIX};

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is invalid: {why}")]
pub struct SettingError {
    pub name: &'static str,
    pub value: String,
    pub why: String,
}

/// TAINT_PREFIX, TAINT_EFFECT, DRY_RUN, ACTIONS, REBALANCE_DRAIN,
/// EXCLUDE_FROM_LOAD_BALANCERS, OUT_OF_SERVICE_TAINT.
pub fn policy(get: &impl Fn(&str) -> Option<String>) -> Result<Policy, SettingError> {
    Ok(Policy {
        prefix: get("TAINT_PREFIX").unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
        taint_effect: match get("TAINT_EFFECT") {
            Some(value) => value.parse().map_err(|why| SettingError {
                name: "TAINT_EFFECT",
                value,
                why,
            })?,
            None => TaintEffect::default(),
        },
        dry_run: flag(get, "DRY_RUN", false)?,
        overrides: overrides(get)?,
        exclude_from_load_balancers: flag(get, "EXCLUDE_FROM_LOAD_BALANCERS", false)?,
        out_of_service_taint: flag(get, "OUT_OF_SERVICE_TAINT", false)?,
    })
}

/// ACTIONS=`kind=response,...` (e.g. `rebalance-recommendation=taint+cordon+drain,
/// instance-stopping=ignore`), with REBALANCE_DRAIN=true as a shortcut for the first.
fn overrides(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<HashMap<InterruptionKind, Response>, SettingError> {
    let mut map = HashMap::new();
    if flag(get, "REBALANCE_DRAIN", false)? {
        map.insert(
            InterruptionKind::RebalanceRecommendation,
            Response::Disrupt(Disruption::FULL),
        );
    }
    let Some(value) = get("ACTIONS") else {
        return Ok(map);
    };
    let invalid = |why: String| SettingError {
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

/// DRAIN_CONCURRENCY, EVICTION_RETRY_SECONDS, POD_TERMINATION_GRACE_PERIOD,
/// DRAIN_EMPTYDIR_PODS, DRAIN_UNMANAGED_PODS, EXCLUDE_NAMESPACES and EXCLUDE_POD_LABELS
/// (`default_exclude_labels` when unset).
pub fn drain(
    get: &impl Fn(&str) -> Option<String>,
    dry_run: bool,
    default_exclude_labels: &str,
) -> Result<DrainSettings, SettingError> {
    let labels = get("EXCLUDE_POD_LABELS").unwrap_or_else(|| default_exclude_labels.to_owned());
    let exclude_pod_labels = list(&labels)
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| SettingError {
                    name: "EXCLUDE_POD_LABELS",
                    value: labels.clone(),
                    why: format!("{pair:?} is not key=value"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let defaults = DrainSettings::default();
    Ok(DrainSettings {
        concurrency: number(get, "DRAIN_CONCURRENCY")?
            .map(|n: usize| n.max(1))
            .unwrap_or(defaults.concurrency),
        eviction_retry_interval: number(get, "EVICTION_RETRY_SECONDS")?
            .map(Duration::from_secs)
            .unwrap_or(defaults.eviction_retry_interval),
        grace_period_override: number(get, "POD_TERMINATION_GRACE_PERIOD")?,
        evict_emptydir: flag(get, "DRAIN_EMPTYDIR_PODS", true)?,
        evict_unmanaged: flag(get, "DRAIN_UNMANAGED_PODS", true)?,
        exclude_namespaces: get("EXCLUDE_NAMESPACES")
            .map(|v| list(&v).map(str::to_owned).collect())
            .unwrap_or_default(),
        exclude_pod_labels,
        dry_run,
        ..defaults
    })
}

/// The non-empty, trimmed items of a comma-separated value.
fn list(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`), `default` when unset.
pub fn flag(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, SettingError> {
    match get(name).as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(other) => Err(SettingError {
            name,
            value: other.to_owned(),
            why: "expected true or false".into(),
        }),
    }
}

/// A number, `None` when unset.
pub fn number<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>, SettingError>
where
    T::Err: std::fmt::Display,
{
    get(name)
        .map(|value| {
            value.parse().map_err(|e: T::Err| SettingError {
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

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn actions_override_the_defaults_and_name_bad_entries() {
        let get = lookup(&[
            (
                "ACTIONS",
                "instance-stopping=ignore, scheduled-maintenance=taint+cordon",
            ),
            ("REBALANCE_DRAIN", "true"),
        ]);
        let p = policy(&get).expect("valid");
        assert_eq!(
            p.overrides[&InterruptionKind::InstanceStopping],
            Response::Ignore
        );
        assert_eq!(
            p.overrides[&InterruptionKind::RebalanceRecommendation],
            Response::Disrupt(Disruption::FULL)
        );
        let err = policy(&lookup(&[("ACTIONS", "spot=drain")]))
            .expect_err("unknown kind")
            .to_string();
        assert!(err.contains("ACTIONS") && err.contains("spot"), "{err}");
    }

    #[test]
    fn drain_selection_settings_parse() {
        let get = lookup(&[
            ("EXCLUDE_NAMESPACES", "nth, kube-system"),
            ("EXCLUDE_POD_LABELS", "app=nth-agent"),
            ("DRAIN_EMPTYDIR_PODS", "false"),
        ]);
        let d = drain(&get, false, "").expect("valid");
        assert_eq!(
            d.exclude_namespaces,
            vec!["nth".to_owned(), "kube-system".to_owned()]
        );
        assert_eq!(
            d.exclude_pod_labels,
            vec![("app".to_owned(), "nth-agent".to_owned())]
        );
        assert!(!d.evict_emptydir && d.evict_unmanaged);
        let defaulted = drain(&lookup(&[]), false, "a=b").expect("valid");
        assert_eq!(
            defaulted.exclude_pod_labels,
            vec![("a".to_owned(), "b".to_owned())]
        );
        let err =
            drain(&lookup(&[("EXCLUDE_POD_LABELS", "app")]), false, "").expect_err("bad pair");
        assert!(err.to_string().contains("EXCLUDE_POD_LABELS"));
    }

    #[test]
    fn flags_accept_only_booleans() {
        assert!(flag(&lookup(&[("X", "Yes")]), "X", false).expect("valid"));
        assert!(flag(&lookup(&[("X", "maybe")]), "X", false).is_err());
        assert!(flag(&lookup(&[]), "X", true).expect("default"));
    }
}
