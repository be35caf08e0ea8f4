//! What nth writes on a node, computed from the node as last read: pure functions, so that
//! every write is decided from the node's current state and checked without a server.
//!
//! `spec.taints` is an atomic list: a patch that names it replaces the whole list on the
//! server. So every change to it sends the complete new list, built from the node's current
//! one (ours added or removed, every other entry kept as it is), and carries the node's
//! `resourceVersion`, so that a write made between our read and our write is never lost (the
//! server answers 409 and we read again).
//!
//! Some marks are not nth's alone: a cordon, the load-balancer exclusion label and the
//! out-of-service taint can be set by an operator too. The owned-marks annotation records
//! which of those nth set itself; a restore takes back only those.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Taint};
use serde_json::{json, Map, Value};

use crate::events::{Interruption, InterruptionKind};
use crate::policy::Policy;

/// The well-known label that takes a node out of external load balancers' target groups.
pub const EXCLUDE_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The well-known taint for a node that is shut down: pods are force-deleted and their
/// volumes detached without waiting for the (gone) kubelet.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// The value Kubernetes documents for the out-of-service taint.
const OUT_OF_SERVICE_VALUE: &str = "nodeshutdown";

/// A mark that others may set too, recorded in the owned-marks annotation when nth set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Shared {
    Cordon,
    ExcludeLbLabel,
    OutOfServiceTaint,
}

impl Shared {
    const ALL: [Self; 3] = [Self::Cordon, Self::ExcludeLbLabel, Self::OutOfServiceTaint];

    fn as_str(self) -> &'static str {
        match self {
            Self::Cordon => "cordon",
            Self::ExcludeLbLabel => "exclude-lb-label",
            Self::OutOfServiceTaint => "out-of-service-taint",
        }
    }
}

/// What a mark asks for.
#[derive(Debug, Clone, Copy)]
pub struct MarkRequest<'a> {
    pub interruption: &'a Interruption,
    pub taint: Option<&'a str>,
    pub cordon: bool,
    /// A drain follows: the load-balancer label goes on when the policy asks for it.
    pub draining: bool,
}

/// A restore's patch, and whether it lifts the cordon.
#[derive(Debug, Clone, PartialEq)]
pub struct RestorePatch {
    pub patch: Value,
    pub uncordons: bool,
}

/// Computes nth's writes under one policy (its prefix, effect and options).
#[derive(Debug, Clone)]
pub struct Marks<'p> {
    policy: &'p Policy,
}

impl<'p> Marks<'p> {
    pub fn new(policy: &'p Policy) -> Self {
        Self { policy }
    }

    /// Does the node already carry everything this mark asks for (a duplicate delivery)?
    pub fn already_marked(&self, node: &Node, request: &MarkRequest<'_>) -> bool {
        let annotated = annotation(node, &self.policy.event_annotation())
            == Some(request.interruption.id.as_str());
        let cordoned = !request.cordon || unschedulable(node);
        let tainted = request
            .taint
            .is_none_or(|key| taints(node).iter().any(|t| t.key == key));
        annotated && cordoned && tainted
    }

    /// The patch that cordons, taints, labels and annotates the node, in one write.
    pub fn mark(&self, node: &Node, request: &MarkRequest<'_>) -> Value {
        let policy = self.policy;
        let mut owned = self.owned(node);
        let mut spec = Map::new();
        if request.cordon && !unschedulable(node) {
            spec.insert("unschedulable".into(), json!(true));
            owned.insert(Shared::Cordon);
        }
        if let Some(key) = request.taint {
            let ours = Taint {
                key: key.to_owned(),
                value: Some(taint_value(&request.interruption.id)),
                effect: policy.taint_effect.as_str().to_owned(),
                time_added: None,
            };
            let current = taints(node);
            if !current.contains(&ours) {
                // One taint per key of ours: an earlier one (another event, another effect)
                // is replaced, not duplicated.
                let mut next: Vec<Taint> = current.into_iter().filter(|t| t.key != key).collect();
                next.push(ours);
                spec.insert("taints".into(), json!(next));
            }
        }
        let mut metadata = json!({
            "resourceVersion": node.metadata.resource_version,
            "annotations": {
                policy.event_annotation(): request.interruption.id,
                policy.kind_annotation(): request.interruption.kind.as_str(),
            },
        });
        if request.draining
            && policy.exclude_from_load_balancers
            && label(node, EXCLUDE_LB_LABEL).is_none()
        {
            metadata["labels"] = json!({ EXCLUDE_LB_LABEL: "true" });
            owned.insert(Shared::ExcludeLbLabel);
        }
        metadata["annotations"][policy.owned_annotation()] = owned_value(&owned);
        json!({ "metadata": metadata, "spec": spec })
    }

    /// The out-of-service taint beside the node's others, once its drain completed; `None`
    /// when the node carries it already.
    pub fn out_of_service(&self, node: &Node) -> Option<Value> {
        let current = taints(node);
        if current.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT) {
            return None;
        }
        let mut owned = self.owned(node);
        owned.insert(Shared::OutOfServiceTaint);
        let mut next = current;
        next.push(Taint {
            key: OUT_OF_SERVICE_TAINT.to_owned(),
            value: Some(OUT_OF_SERVICE_VALUE.to_owned()),
            effect: "NoExecute".to_owned(),
            time_added: None,
        });
        Some(json!({
            "metadata": {
                "resourceVersion": node.metadata.resource_version,
                "annotations": { self.policy.owned_annotation(): owned_value(&owned) },
            },
            "spec": { "taints": next },
        }))
    }

    /// Takes back every mark of nth's, whatever kind of event put it there: its taints, its
    /// annotations, and the cordon, label and out-of-service taint only where nth set them.
    /// `allow_uncordon` false keeps the cordon even so (a caller that knows better).
    pub fn restore(&self, node: &Node, allow_uncordon: bool) -> RestorePatch {
        let policy = self.policy;
        let owned = self.owned(node);
        let ours: BTreeSet<String> = InterruptionKind::ALL
            .iter()
            .filter(|k| !k.taint_suffix().is_empty())
            .map(|k| policy.taint_key(*k))
            .collect();
        let current = taints(node);
        let kept: Vec<Taint> = current
            .iter()
            .filter(|t| {
                let nths_out_of_service =
                    t.key == OUT_OF_SERVICE_TAINT && owned.contains(&Shared::OutOfServiceTaint);
                !ours.contains(&t.key) && !nths_out_of_service
            })
            .cloned()
            .collect();
        let mut annotations = Map::new();
        for key in policy.annotations() {
            if annotation(node, &key).is_some() {
                annotations.insert(key, Value::Null);
            }
        }
        let mut metadata = json!({
            "resourceVersion": node.metadata.resource_version,
            "annotations": annotations,
        });
        if owned.contains(&Shared::ExcludeLbLabel) {
            metadata["labels"] = json!({ EXCLUDE_LB_LABEL: null });
        }
        let mut spec = Map::new();
        if kept.len() != current.len() {
            spec.insert("taints".into(), json!(kept));
        }
        let uncordons = allow_uncordon && owned.contains(&Shared::Cordon) && unschedulable(node);
        if uncordons {
            spec.insert("unschedulable".into(), Value::Null);
        }
        RestorePatch {
            patch: json!({ "metadata": metadata, "spec": spec }),
            uncordons,
        }
    }

    /// Does the node carry any mark of nth's at all?
    pub fn any(&self, node: &Node) -> bool {
        let policy = self.policy;
        let annotated = policy
            .annotations()
            .iter()
            .any(|key| annotation(node, key).is_some());
        let prefix = format!("{}/", policy.prefix);
        annotated || taints(node).iter().any(|t| t.key.starts_with(&prefix))
    }

    fn owned(&self, node: &Node) -> BTreeSet<Shared> {
        let value = annotation(node, &self.policy.owned_annotation()).unwrap_or_default();
        value
            .split(',')
            .filter_map(|name| Shared::ALL.into_iter().find(|s| s.as_str() == name.trim()))
            .collect()
    }
}

fn owned_value(owned: &BTreeSet<Shared>) -> Value {
    if owned.is_empty() {
        return Value::Null;
    }
    let names: Vec<&str> = owned.iter().map(|s| s.as_str()).collect();
    json!(names.join(","))
}

pub(crate) fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

fn unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// Taint values must be valid label values (at most 63 characters of `[A-Za-z0-9_.-]`,
/// alphanumeric at both ends); event ids usually are, and anything else is cut to fit.
fn taint_value(id: &str) -> String {
    let cleaned: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn node(extra: Value) -> Node {
        let mut base = json!({
            "metadata": {"name": "n1", "resourceVersion": "42", "labels": {"team": "a"},
                         "annotations": {"owner.example.com/note": "keep"}},
            "spec": {"taints": [
                {"key": "dedicated", "value": "batch", "effect": "NoSchedule"},
                {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
            ]},
        });
        merge(&mut base, extra);
        serde_json::from_value(base).expect("a valid node")
    }

    fn merge(base: &mut Value, extra: Value) {
        match (base, extra) {
            (Value::Object(b), Value::Object(e)) => {
                for (k, v) in e {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
            (b, e) => *b = e,
        }
    }

    /// The node as the server leaves it after a strategic-merge patch: maps merged by key,
    /// `null` deleting, and the atomic `spec.taints` replaced whole.
    fn apply(node: &Node, patch: &Value) -> Node {
        let mut value = serde_json::to_value(node).expect("serialises");
        fn strategic(target: &mut Value, patch: &Value) {
            let (Value::Object(t), Value::Object(p)) = (target, patch) else {
                return;
            };
            for (k, v) in p {
                match v {
                    Value::Null => {
                        t.remove(k);
                    }
                    Value::Object(_) if k != "taints" => {
                        strategic(t.entry(k.clone()).or_insert(json!({})), v);
                    }
                    other => {
                        t.insert(k.clone(), other.clone());
                    }
                }
            }
        }
        strategic(&mut value, patch);
        serde_json::from_value(value).expect("still a node")
    }

    fn interruption(kind: InterruptionKind) -> Interruption {
        Interruption {
            id: "e-1".into(),
            kind,
            instance_id: "i-1".into(),
            event_time: Utc::now(),
            deadline: None,
            detail: String::new(),
            lifecycle: None,
        }
    }

    fn keys(node: &Node) -> Vec<String> {
        taints(node).into_iter().map(|t| t.key).collect()
    }

    #[test]
    fn a_mark_keeps_foreign_taints_and_carries_the_resource_version() {
        let policy = Policy::default();
        let marks = Marks::new(&policy);
        let before = node(json!({}));
        let ev = interruption(InterruptionKind::RebalanceRecommendation);
        let key = policy.taint_key(ev.kind);
        let request = MarkRequest {
            interruption: &ev,
            taint: Some(&key),
            cordon: true,
            draining: false,
        };
        let patch = marks.mark(&before, &request);
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        let after = apply(&before, &patch);
        assert_eq!(
            keys(&after),
            vec!["dedicated", "nvidia.com/gpu", key.as_str()]
        );
        assert!(unschedulable(&after));
        assert_eq!(annotation(&after, "owner.example.com/note"), Some("keep"));
        assert!(marks.already_marked(&after, &request));
    }

    #[test]
    fn a_restore_removes_every_mark_of_ours_and_nothing_else() {
        let policy = Policy {
            exclude_from_load_balancers: true,
            out_of_service_taint: true,
            ..Policy::default()
        };
        let marks = Marks::new(&policy);
        let original = node(json!({}));
        let rebalance = interruption(InterruptionKind::RebalanceRecommendation);
        let stop = interruption(InterruptionKind::InstanceStopping);
        let (k1, k2) = (
            policy.taint_key(rebalance.kind),
            policy.taint_key(stop.kind),
        );
        let mut n = apply(
            &original,
            &marks.mark(
                &original,
                &MarkRequest {
                    interruption: &rebalance,
                    taint: Some(&k1),
                    cordon: true,
                    draining: false,
                },
            ),
        );
        n = apply(
            &n,
            &marks.mark(
                &n,
                &MarkRequest {
                    interruption: &stop,
                    taint: Some(&k2),
                    cordon: true,
                    draining: true,
                },
            ),
        );
        n = apply(&n, &marks.out_of_service(&n).expect("not there yet"));
        assert_eq!(keys(&n).len(), 5);
        let restore = marks.restore(&n, true);
        assert!(restore.uncordons);
        let after = apply(&n, &restore.patch);
        assert_eq!(keys(&after), keys(&original));
        assert!(!unschedulable(&after));
        assert!(label(&after, EXCLUDE_LB_LABEL).is_none());
        assert_eq!(after.metadata.labels, original.metadata.labels);
        assert_eq!(after.metadata.annotations, original.metadata.annotations);
        assert!(!marks.any(&after));
    }

    #[test]
    fn an_operators_cordon_label_and_out_of_service_taint_stay() {
        let policy = Policy {
            exclude_from_load_balancers: true,
            out_of_service_taint: true,
            ..Policy::default()
        };
        let marks = Marks::new(&policy);
        let original = node(json!({
            "metadata": {"labels": {EXCLUDE_LB_LABEL: "true"}},
            "spec": {"unschedulable": true, "taints": [
                {"key": OUT_OF_SERVICE_TAINT, "value": OUT_OF_SERVICE_VALUE, "effect": "NoExecute"},
            ]},
        }));
        let stop = interruption(InterruptionKind::InstanceStopping);
        let key = policy.taint_key(stop.kind);
        let mut n = apply(
            &original,
            &marks.mark(
                &original,
                &MarkRequest {
                    interruption: &stop,
                    taint: Some(&key),
                    cordon: true,
                    draining: true,
                },
            ),
        );
        assert!(
            marks.out_of_service(&n).is_none(),
            "already there: not added twice"
        );
        let restore = marks.restore(&n, true);
        assert!(!restore.uncordons, "the cordon was there before nth's");
        n = apply(&n, &restore.patch);
        assert!(unschedulable(&n));
        assert_eq!(label(&n, EXCLUDE_LB_LABEL), Some("true"));
        assert_eq!(keys(&n), vec![OUT_OF_SERVICE_TAINT]);
    }

    #[test]
    fn a_repeated_mark_does_not_duplicate_a_taint_and_a_new_effect_replaces_ours() {
        let mut policy = Policy::default();
        let ev = interruption(InterruptionKind::SpotInterruption);
        let key = policy.taint_key(ev.kind);
        let request = MarkRequest {
            interruption: &ev,
            taint: Some(&key),
            cordon: false,
            draining: false,
        };
        let n = apply(
            &node(json!({})),
            &Marks::new(&policy).mark(&node(json!({})), &request),
        );
        let again = Marks::new(&policy).mark(&n, &request);
        assert!(again["spec"].get("taints").is_none(), "{again}");
        policy.taint_effect = "NoExecute".parse().expect("an effect");
        let n = apply(&n, &Marks::new(&policy).mark(&n, &request));
        let ours: Vec<Taint> = taints(&n).into_iter().filter(|t| t.key == key).collect();
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].effect, "NoExecute");
    }

    #[test]
    fn taint_values_are_valid_label_values() {
        assert_eq!(
            taint_value("1e5527d7-bb36-4607-3370-4164db56a40e"),
            "1e5527d7-bb36-4607-3370-4164db56a40e"
        );
        assert_eq!(taint_value("a:b/c"), "a-b-c");
        assert_eq!(taint_value(&"x".repeat(80)).len(), 63);
        assert_eq!(taint_value("-x-"), "x");
    }
}
