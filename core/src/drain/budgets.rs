//! The PodDisruptionBudgets over the node's pods, followed by one WATCH: a pod its budget
//! refused is tried again as soon as the budget allows a disruption (its
//! `status.disruptionsAllowed`, which the disruption controller and the eviction handler
//! keep), not on a timer. One LIST and one WATCH of budgets per drain, whatever the number
//! of pods; the requests grow with budget changes, never with pods times time.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// A budget, by namespace and name.
pub(crate) type BudgetKey = (String, String);

/// The longest single watch request (kube requires less than 295 s); another follows from
/// where it ended.
const MAX_WATCH_SECONDS: u32 = 60;

/// Watch failures in a row before the watch is given up and refused pods fall back to the
/// fixed retry interval.
const WATCH_FAILURES: u32 = 3;

/// What is known of one budget.
#[derive(Debug, Clone)]
struct Budget {
    selector: Option<LabelSelector>,
    allowed: i32,
    /// When the budget last allowed a disruption, as far as this drain saw.
    last_allowed: Option<DateTime<Utc>>,
}

/// A change the watch saw: the budget now allows this many disruptions.
#[derive(Debug, Clone)]
pub(crate) struct Allowance {
    pub key: BudgetKey,
    pub allowed: i32,
}

/// The budgets and their watch. The watch task ends when this is dropped.
#[derive(Debug)]
pub(crate) struct Budgets {
    budgets: BTreeMap<BudgetKey, Budget>,
    updates: Option<mpsc::UnboundedReceiver<PodDisruptionBudget>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Budgets {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Budgets {
    /// Lists the cluster's budgets and starts watching them. When they cannot be listed (a
    /// role without the permission, an old server), no budget is known and every refused
    /// eviction is retried on the fixed interval, as before.
    pub(crate) async fn watch(client: &Client) -> Self {
        let api: Api<PodDisruptionBudget> = Api::all(client.clone());
        let params = ListParams::default();
        let listed = crate::retry::idempotent("list budgets", || api.list(&params)).await;
        let list = match listed {
            Ok(list) => list,
            Err(error) => {
                warn!(%error, "PodDisruptionBudgets cannot be listed; refused evictions are retried on a timer");
                return Self {
                    budgets: BTreeMap::new(),
                    updates: None,
                    task: None,
                };
            }
        };
        let mut budgets = BTreeMap::new();
        let now = Utc::now();
        for pdb in &list.items {
            if let Some((key, budget)) = budget_of(pdb, now) {
                budgets.insert(key, budget);
            }
        }
        let (sender, updates) = mpsc::unbounded_channel();
        let rv = list.metadata.resource_version.unwrap_or_default();
        let task = tokio::spawn(tracing::Instrument::instrument(
            follow(api, rv, sender),
            tracing::Span::current(),
        ));
        Self {
            budgets,
            updates: Some(updates),
            task: Some(task),
        }
    }

    /// A set with no budgets and no watch: every refusal waits for the timer.
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self {
            budgets: BTreeMap::new(),
            updates: None,
            task: None,
        }
    }

    /// Whether budget changes arrive: otherwise refused pods wait for the fixed interval.
    pub(crate) fn watching(&self) -> bool {
        self.updates.is_some()
    }

    /// The one budget that covers `pod` (same namespace, selector matches). `None` for no
    /// budget, and for several: the Eviction API refuses such a pod with a 500 whatever the
    /// budgets say, so no budget change can be waited for.
    pub(crate) fn covering(&self, pod: &Pod) -> Option<BudgetKey> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let mut matching = self.budgets.iter().filter(|((ns, _), b)| {
            ns == namespace && b.selector.as_ref().is_some_and(|s| selects(s, &labels))
        });
        let first = matching.next().map(|(k, _)| k.clone());
        if matching.next().is_some() {
            return None;
        }
        first
    }

    /// Disruptions the budget allows, as last seen.
    pub(crate) fn allowed(&self, key: &BudgetKey) -> i32 {
        self.budgets.get(key).map_or(0, |b| b.allowed)
    }

    /// When the budget last allowed a disruption, as far as this drain saw.
    pub(crate) fn last_allowed(&self, key: &BudgetKey) -> Option<DateTime<Utc>> {
        self.budgets.get(key).and_then(|b| b.last_allowed)
    }

    /// An eviction under the budget was accepted: it allowed one just now, and has one
    /// fewer to allow until the watch brings the server's count.
    pub(crate) fn note_accepted(&mut self, key: &BudgetKey) {
        if let Some(budget) = self.budgets.get_mut(key) {
            budget.last_allowed = Some(Utc::now());
            budget.allowed = (budget.allowed - 1).max(0);
        }
    }

    /// The next change to a budget's allowance. `None` once the watch has ended for good;
    /// from then on [`Budgets::watching`] is false. Never resolves when there is no watch.
    pub(crate) async fn next_change(&mut self) -> Option<Allowance> {
        let Some(updates) = self.updates.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let Some(pdb) = updates.recv().await else {
                warn!(
                    "the PodDisruptionBudget watch ended; refused evictions are retried on a timer"
                );
                self.updates = None;
                return None;
            };
            let Some((key, budget)) = budget_of(&pdb, Utc::now()) else {
                continue;
            };
            let allowed = budget.allowed;
            let last_allowed = budget
                .last_allowed
                .or_else(|| self.budgets.get(&key).and_then(|b| b.last_allowed));
            self.budgets.insert(
                key.clone(),
                Budget {
                    last_allowed,
                    ..budget
                },
            );
            return Some(Allowance { key, allowed });
        }
    }
}

/// The budget's key and what it says now.
fn budget_of(pdb: &PodDisruptionBudget, now: DateTime<Utc>) -> Option<(BudgetKey, Budget)> {
    let key = (pdb.metadata.namespace.clone()?, pdb.metadata.name.clone()?);
    let allowed = pdb
        .status
        .as_ref()
        .map_or(0, |s| s.disruptions_allowed)
        .max(0);
    let selector = pdb.spec.as_ref().and_then(|s| s.selector.clone());
    Some((
        key,
        Budget {
            selector,
            allowed,
            last_allowed: (allowed > 0).then_some(now),
        },
    ))
}

/// Follows the budgets from `rv`, sending every added or changed one (a deleted one is
/// sent with no selector, so that it covers no pod any more). Ends after
/// [`WATCH_FAILURES`] failures in a row, or when the receiver is gone.
async fn follow(
    api: Api<PodDisruptionBudget>,
    mut rv: String,
    sender: mpsc::UnboundedSender<PodDisruptionBudget>,
) {
    let mut failures = 0;
    while failures < WATCH_FAILURES && !sender.is_closed() {
        let params = WatchParams::default().timeout(MAX_WATCH_SECONDS);
        let stream = match api.watch(&params, &rv).await {
            Ok(stream) => stream,
            Err(error) => {
                failures += 1;
                debug!(%error, "budget watch failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        futures::pin_mut!(stream);
        loop {
            match stream.try_next().await {
                Ok(Some(WatchEvent::Added(pdb) | WatchEvent::Modified(pdb))) => {
                    failures = 0;
                    rv = pdb.metadata.resource_version.clone().unwrap_or(rv);
                    if sender.send(pdb).is_err() {
                        return;
                    }
                }
                Ok(Some(WatchEvent::Deleted(mut pdb))) => {
                    rv = pdb.metadata.resource_version.clone().unwrap_or(rv);
                    if let Some(spec) = pdb.spec.as_mut() {
                        spec.selector = None;
                    }
                    if sender.send(pdb).is_err() {
                        return;
                    }
                }
                Ok(Some(WatchEvent::Bookmark(bookmark))) => {
                    rv = bookmark.metadata.resource_version;
                }
                Ok(Some(WatchEvent::Error(status))) => {
                    // 410: the server no longer holds `rv`; list again and go on from there.
                    failures += 1;
                    debug!(code = status.code, message = %status.message, "budget watch error");
                    match relist(&api, &sender).await {
                        Some(fresh) => rv = fresh,
                        None => return,
                    }
                    break;
                }
                Ok(None) => break,
                Err(error) => {
                    failures += 1;
                    debug!(%error, "budget watch broke");
                    break;
                }
            }
        }
    }
}

/// Lists the budgets again, sends each, and returns the list's resourceVersion.
async fn relist(
    api: &Api<PodDisruptionBudget>,
    sender: &mpsc::UnboundedSender<PodDisruptionBudget>,
) -> Option<String> {
    let list = api.list(&ListParams::default()).await.ok()?;
    for pdb in list.items {
        sender.send(pdb).ok()?;
    }
    list.metadata.resource_version
}

/// Whether `selector` selects a pod with `labels` (policy/v1: an empty selector selects
/// every pod of the namespace).
pub(crate) fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An operator the API server would have refused selects nothing.
            _ => false,
        }
    });
    by_label && by_expression
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn selector(v: serde_json::Value) -> LabelSelector {
        serde_json::from_value(v).expect("a selector")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        assert!(selects(&selector(json!({})), &web), "empty selects all");
        assert!(selects(
            &selector(json!({"matchLabels": {"app": "web"}})),
            &web
        ));
        assert!(!selects(
            &selector(json!({"matchLabels": {"app": "db"}})),
            &web
        ));
        let expr = |op: &str, values: serde_json::Value| {
            selector(
                json!({"matchExpressions": [{"key": "tier", "operator": op, "values": values}]}),
            )
        };
        assert!(selects(&expr("In", json!(["front", "back"])), &web));
        assert!(!selects(&expr("NotIn", json!(["front"])), &web));
        assert!(selects(&expr("Exists", json!(null)), &web));
        assert!(!selects(&expr("DoesNotExist", json!(null)), &web));
        assert!(selects(&expr("NotIn", json!(["front"])), &labels(&[])));
    }

    #[test]
    fn a_pod_under_two_budgets_has_no_budget_to_wait_for() {
        let pdb = |name: &str| -> PodDisruptionBudget {
            serde_json::from_value(json!({
                "metadata": {"namespace": "shop", "name": name},
                "spec": {"selector": {"matchLabels": {"app": "web"}}},
                "status": {"disruptionsAllowed": 1, "currentHealthy": 1, "desiredHealthy": 0, "expectedPods": 1}
            }))
            .expect("a budget")
        };
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"namespace": "shop", "name": "w", "labels": {"app": "web"}}}),
        )
        .expect("a pod");
        let mut budgets = Budgets::none();
        let (key, budget) = budget_of(&pdb("one"), Utc::now()).expect("keyed");
        budgets.budgets.insert(key.clone(), budget);
        assert_eq!(budgets.covering(&pod), Some(key));
        let (key, budget) = budget_of(&pdb("two"), Utc::now()).expect("keyed");
        budgets.budgets.insert(key, budget);
        assert_eq!(budgets.covering(&pod), None);
    }
}
