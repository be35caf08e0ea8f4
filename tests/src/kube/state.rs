//! The emulated cluster's objects and the rules the real API server applies to them:
//! graceful deletion, evictions checked against PodDisruptionBudgets, and a ReplicaSet
//! controller that replaces evicted pods on another node.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use super::status::{ApiError, FieldError};
use super::validate;

/// A namespaced object's key.
pub type Key = (String, String);

/// How the emulated kubelet and controllers behave.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// How long a pod's containers take to exit after SIGTERM (capped by its grace period).
    pub pod_stop_delay: Duration,
    /// Where replacements of evicted ReplicaSet pods are scheduled; `None` leaves them Pending.
    pub spare_node: Option<String>,
    /// How long a replacement pod takes to turn Ready.
    pub replacement_ready_delay: Duration,
    /// Emulated seconds per real second for grace periods: 0.01 makes a pod that ignores
    /// SIGTERM with 100 s of grace go after 1 s. Order is kept; only the clock runs faster.
    pub time_scale: f64,
    /// Server-side time an eviction takes, to make concurrency observable.
    pub eviction_latency: Duration,
}

impl Behaviour {
    /// How long `pod`'s containers take to exit after SIGTERM: its
    /// `emulator.nth.dev/stop-delay-ms` annotation, else `pod_stop_delay`.
    pub fn stop_delay(&self, pod: &Value) -> Duration {
        pod.pointer("/metadata/annotations/emulator.nth.dev~1stop-delay-ms")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(self.pod_stop_delay)
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            pod_stop_delay: Duration::from_millis(100),
            spare_node: None,
            replacement_ready_delay: Duration::from_millis(500),
            time_scale: 1.0,
            eviction_latency: Duration::ZERO,
        }
    }
}

/// One accepted eviction.
#[derive(Debug, Clone)]
pub struct EvictionRecord {
    pub key: Key,
    /// `deleteOptions.gracePeriodSeconds`, when the client set it.
    pub grace_seconds: Option<i64>,
    pub at: Instant,
}

/// One change to a pod or a PodDisruptionBudget, as a watch reports it.
#[derive(Debug, Clone)]
pub struct WatchChange {
    /// `pods` or `poddisruptionbudgets`.
    pub resource: &'static str,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub object: Value,
}

/// Live changes, with the resourceVersion each happened at.
pub type ChangeReceiver = tokio::sync::broadcast::Receiver<(u64, Arc<WatchChange>)>;

/// How many changes a watch can resume from, like the API server's watch cache.
const WATCH_HISTORY: usize = 20_000;

/// What happened, for tests and benchmarks to assert on.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// Lowest healthy-pod count each PDB ever had, from the moment it was added.
    pub pdb_min_healthy: HashMap<Key, i64>,
    /// Evictions refused with 429 because of a PDB.
    pub evictions_refused: u64,
    pub evictions_accepted: u64,
    pub evictions: Vec<EvictionRecord>,
}

/// A timer the server must start after the state changed (the state itself never sleeps).
#[derive(Debug)]
pub enum Timer {
    /// Remove the pod (its containers stopped) if it still has this uid.
    RemovePod {
        key: Key,
        uid: String,
        after: Duration,
    },
    /// Mark the pod Ready.
    PodReady {
        key: Key,
        uid: String,
        after: Duration,
    },
}

/// The kinds of object the emulator writes through the API (PATCH and PUT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Pod,
}

impl Kind {
    /// The resource name, as in URLs and in the real server's 404 and 409 messages.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
        }
    }
}

/// Which part of an object a write may change: the object itself (its status is kept as it
/// was) or its `status` subresource (its spec is kept as it was), as the real registry's
/// PrepareForUpdate does for nodes and pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

#[derive(Debug)]
pub struct World {
    pub behaviour: Behaviour,
    pub nodes: BTreeMap<String, Value>,
    pub pods: BTreeMap<Key, Value>,
    pub pdbs: BTreeMap<Key, Value>,
    /// Kubernetes Events (core/v1) posted to the server.
    pub events: Vec<Value>,
    /// Namespaces being deleted: creates, evictions included, are refused there.
    pub terminating_namespaces: BTreeSet<String>,
    pub record: Record,
    resource_version: u64,
    uid_counter: u64,
    /// Shared, not copied: every watcher of a busy cluster sees every change.
    history: VecDeque<(u64, Arc<WatchChange>)>,
    /// Each budget's status as last published: the disruption controller writes a budget's
    /// status (a new resourceVersion, a MODIFIED event) only when it changes.
    pdb_status: HashMap<Key, Value>,
    changes: tokio::sync::broadcast::Sender<(u64, Arc<WatchChange>)>,
}

pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

pub fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

pub fn is_terminating(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp").is_some()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let match_labels = selector.get("matchLabels").and_then(Value::as_object);
    let expressions = selector.get("matchExpressions").and_then(Value::as_array);
    if match_labels.is_none_or(|m| m.is_empty()) && expressions.is_none_or(|e| e.is_empty()) {
        // policy/v1: an empty selector selects every pod in the namespace.
        return true;
    }
    let ok_labels = match_labels.is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let ok_expr = expressions.is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&Value> = e["values"]
                .as_array()
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            let have = labels.get(key);
            match e["operator"].as_str() {
                Some("In") => have.is_some_and(|h| values.contains(&h)),
                Some("NotIn") => have.is_none_or(|h| !values.contains(&h)),
                Some("Exists") => have.is_some(),
                Some("DoesNotExist") => have.is_none(),
                _ => false,
            }
        })
    });
    ok_labels && ok_expr
}

/// `intstr`: an integer, or a percentage of `total` (rounded up, as the disruption
/// controller rounds minAvailable and maxUnavailable).
fn int_or_percent(v: &Value, total: i64) -> Option<i64> {
    if let Some(n) = v.as_i64() {
        return Some(n);
    }
    let pct: i64 = v.as_str()?.strip_suffix('%')?.parse().ok()?;
    Some((pct * total + 99) / 100)
}

impl World {
    pub fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            pdbs: BTreeMap::new(),
            events: Vec::new(),
            terminating_namespaces: BTreeSet::new(),
            record: Record::default(),
            resource_version: 0,
            uid_counter: 0,
            history: VecDeque::new(),
            pdb_status: HashMap::new(),
            changes: tokio::sync::broadcast::channel(4096).0,
        }
    }

    /// Publishes a pod change to watchers, at the current resourceVersion.
    fn pod_changed(&mut self, kind: &'static str, pod: Value) {
        self.changed("pods", kind, pod);
    }

    /// Publishes a change to watchers, at the current resourceVersion.
    fn changed(&mut self, resource: &'static str, kind: &'static str, object: Value) {
        let change = Arc::new(WatchChange {
            resource,
            kind,
            object,
        });
        let rv = self.resource_version;
        if self.history.len() == WATCH_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((rv, Arc::clone(&change)));
        let _no_watchers = self.changes.send((rv, change));
    }

    /// Changes after `resource_version` and a receiver for those to come, taken together so
    /// none is missed; `None` when the history no longer reaches back that far (410 Gone).
    pub fn watch_from(
        &self,
        resource_version: u64,
    ) -> Option<(Vec<Arc<WatchChange>>, ChangeReceiver)> {
        if resource_version < self.oldest_watchable() {
            return None;
        }
        let past = self
            .history
            .iter()
            .filter(|(rv, _)| *rv > resource_version)
            .map(|(_, c)| c.clone())
            .collect();
        Some((past, self.changes.subscribe()))
    }

    /// The oldest resourceVersion a watch can still start from, as the real server's 410
    /// names it.
    pub fn oldest_watchable(&self) -> u64 {
        self.history
            .front()
            .map_or(self.resource_version, |(rv, _)| rv.saturating_sub(1))
    }

    pub fn next_resource_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    pub fn current_resource_version(&self) -> String {
        self.resource_version.to_string()
    }

    fn next_uid(&mut self) -> String {
        self.uid_counter += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.uid_counter)
    }

    /// Fills in what the API server sets on create: uid, resourceVersion, creationTimestamp.
    pub fn stamp(&mut self, obj: &mut Value) {
        let uid = self.next_uid();
        let rv = self.next_resource_version();
        let meta = &mut obj["metadata"];
        if meta.get("uid").is_none() {
            meta["uid"] = json!(uid);
        }
        meta["resourceVersion"] = json!(rv);
        meta["creationTimestamp"] = json!(now_rfc3339());
    }

    pub fn add_node(&mut self, mut node: Value) {
        self.stamp(&mut node);
        let name = str_at(&node, "/metadata/name")
            .unwrap_or_default()
            .to_owned();
        self.nodes.insert(name, node);
    }

    pub fn add_pod(&mut self, mut pod: Value) {
        self.stamp(&mut pod);
        let key = key_of(&pod);
        self.pods.insert(key, pod.clone());
        self.pod_changed("ADDED", pod);
        self.observe_pdbs();
    }

    /// Creates the budget, or replaces its spec (keeping its uid) as an update would.
    pub fn add_pdb(&mut self, mut pdb: Value) {
        let key = key_of(&pdb);
        let kind = match self.pdbs.get(&key) {
            Some(old) => {
                pdb["metadata"]["uid"] = old["metadata"]["uid"].clone();
                pdb["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                pdb["metadata"]["resourceVersion"] = json!(self.next_resource_version());
                "MODIFIED"
            }
            None => {
                self.stamp(&mut pdb);
                "ADDED"
            }
        };
        self.pdbs.insert(key.clone(), pdb.clone());
        let published = self.pdb_with_status(&pdb);
        self.pdb_status.insert(key, published["status"].clone());
        self.changed("poddisruptionbudgets", kind, published);
        self.observe_pdbs();
    }

    /// An update through the API (PATCH or PUT): `change` turns the stored object into the
    /// requested one; then the real server's rules apply in its order: name and namespace
    /// as in the URL (400), the resourceVersion precondition (409), the part the endpoint
    /// may not change reset, validation (422). A write that changes nothing keeps the resourceVersion and tells
    /// no watcher, as on the real server.
    pub fn write(
        &mut self,
        kind: Kind,
        key: &Key,
        part: Part,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let resource = kind.resource();
        let name = key.1.as_str();
        let stored = match kind {
            Kind::Node => self.nodes.get(name),
            Kind::Pod => self.pods.get(key),
        };
        let old = stored
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        let mut new = old.clone();
        change(&mut new)?;
        let new_name = str_at(&new, "/metadata/name").unwrap_or_default();
        if new_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({new_name}) does not match the name on the URL ({name})"
            )));
        }
        if kind == Kind::Pod {
            match str_at(&new, "/metadata/namespace") {
                Some(ns) if ns != key.0 => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
                Some(_) => {}
                None => new["metadata"]["namespace"] = json!(key.0),
            }
        }
        let old_rv = str_at(&old, "/metadata/resourceVersion").unwrap_or_default();
        if let Some(want) = str_at(&new, "/metadata/resourceVersion").filter(|rv| !rv.is_empty()) {
            if want.parse::<u64>().is_err() {
                return Err(ApiError::internal(format!(
                    "strconv.ParseUint: parsing {want:?}: invalid syntax"
                )));
            }
            if want != old_rv {
                return Err(ApiError::modified(resource, name));
            }
        }
        match str_at(&new, "/metadata/uid").filter(|u| !u.is_empty()) {
            Some(uid) if Some(uid) != str_at(&old, "/metadata/uid") => {
                let error = FieldError {
                    field: "metadata.uid".into(),
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: {uid:?}: field is immutable"),
                };
                return Err(ApiError::invalid_object(kind.name(), name, &[error]));
            }
            Some(_) => {}
            None => new["metadata"]["uid"] = old["metadata"]["uid"].clone(),
        }
        // Set by the server only: whatever the request said, the stored values stay.
        for field in [
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(meta) = new["metadata"].as_object_mut() {
                        meta.remove(field);
                    }
                }
            }
        }
        new["kind"] = old["kind"].clone();
        new["apiVersion"] = old["apiVersion"].clone();
        let kept = match part {
            Part::Main => "status",
            Part::Status => "spec",
        };
        match old.get(kept) {
            Some(v) => new[kept] = v.clone(),
            None => {
                if let Some(obj) = new.as_object_mut() {
                    obj.remove(kept);
                }
            }
        }
        match kind {
            Kind::Node => {
                validate::normalise_node(&mut new);
                validate::node(&old, &new)?;
            }
            Kind::Pod => validate::pod(&old, &new)?,
        }
        new["metadata"]["resourceVersion"] = json!(old_rv);
        if new == old {
            return Ok(old);
        }
        new["metadata"]["resourceVersion"] = json!(self.next_resource_version());
        match kind {
            Kind::Node => {
                self.nodes.insert(name.to_owned(), new.clone());
            }
            Kind::Pod => {
                self.pods.insert(key.clone(), new.clone());
                self.pod_changed("MODIFIED", new.clone());
                self.observe_pdbs();
            }
        }
        Ok(new)
    }

    /// Pods the PDB selects: same namespace, selector matches.
    fn selected<'a>(&'a self, pdb: &'a Value) -> impl Iterator<Item = &'a Value> + 'a {
        let ns = str_at(pdb, "/metadata/namespace").unwrap_or("default");
        let selector = pdb.pointer("/spec/selector").cloned().unwrap_or(json!({}));
        self.pods.values().filter(move |p| {
            str_at(p, "/metadata/namespace") == Some(ns)
                && labels_match(
                    &selector,
                    p.pointer("/metadata/labels").unwrap_or(&Value::Null),
                )
        })
    }

    /// (currentHealthy, desiredHealthy, expectedPods) as the disruption controller computes
    /// them: healthy = Ready and not terminating; expected = pods that are not terminating.
    pub fn pdb_numbers(&self, pdb: &Value) -> (i64, i64, i64) {
        let mut healthy = 0;
        let mut expected = 0;
        for pod in self.selected(pdb) {
            if is_terminating(pod) {
                continue;
            }
            expected += 1;
            if is_ready(pod) {
                healthy += 1;
            }
        }
        let spec = &pdb["spec"];
        let desired = if let Some(min) = spec.get("minAvailable") {
            int_or_percent(min, expected).unwrap_or(0)
        } else if let Some(max) = spec.get("maxUnavailable") {
            (expected - int_or_percent(max, expected).unwrap_or(0)).max(0)
        } else {
            0
        };
        (healthy, desired, expected)
    }

    /// Records the healthy count of every PDB and, as the disruption controller does,
    /// writes the status of each whose numbers changed (a MODIFIED event); called after
    /// every change to pods.
    fn observe_pdbs(&mut self) {
        let counts: Vec<(Key, i64)> = self
            .pdbs
            .iter()
            .map(|(k, pdb)| (k.clone(), self.pdb_numbers(pdb).0))
            .collect();
        for (key, healthy) in counts {
            let min = self.record.pdb_min_healthy.entry(key).or_insert(healthy);
            *min = (*min).min(healthy);
        }
        let keys: Vec<Key> = self.pdbs.keys().cloned().collect();
        for key in keys {
            let Some(pdb) = self.pdbs.get(&key) else {
                continue;
            };
            let status = self.pdb_with_status(pdb)["status"].clone();
            if self.pdb_status.get(&key) == Some(&status) {
                continue;
            }
            let rv = self.next_resource_version();
            let Some(stored) = self.pdbs.get_mut(&key) else {
                continue;
            };
            stored["metadata"]["resourceVersion"] = json!(rv);
            let mut published = stored.clone();
            published["status"] = status.clone();
            self.pdb_status.insert(key, status);
            self.changed("poddisruptionbudgets", "MODIFIED", published);
        }
    }

    /// The PDB as the API returns it, with its status computed.
    pub fn pdb_with_status(&self, pdb: &Value) -> Value {
        let (healthy, desired, expected) = self.pdb_numbers(pdb);
        let mut out = pdb.clone();
        out["status"] = json!({
            "currentHealthy": healthy,
            "desiredHealthy": desired,
            "expectedPods": expected,
            "disruptionsAllowed": (healthy - desired).max(0),
            "observedGeneration": 1,
        });
        out
    }

    /// Deletion as the pod registry does it: a grace period (the request's, else the pod's
    /// own) for a pod a kubelet runs, none for a pod that is unscheduled or finished. With a
    /// grace period the pod turns terminating and goes once its containers stop; with none
    /// it goes at once. Deleting a terminating pod again can only shorten its grace.
    /// Returns the pod as the answer shows it, and the timers to start.
    pub fn delete_pod(
        &mut self,
        key: &Key,
        grace_seconds: Option<i64>,
        precondition_uid: Option<&str>,
    ) -> Result<(Value, Vec<Timer>), ApiError> {
        let pod = self
            .pods
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found("pods", &key.1))?;
        let uid = str_at(&pod, "/metadata/uid").unwrap_or_default().to_owned();
        if let Some(want) = precondition_uid {
            if want != uid {
                return Err(ApiError::uid_precondition("Pod", &key.1, want, &uid));
            }
        }
        let own = pod
            .pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30);
        let mut grace = grace_seconds.unwrap_or(own);
        let unscheduled = str_at(&pod, "/spec/nodeName").is_none_or(str::is_empty);
        let finished = matches!(str_at(&pod, "/status/phase"), Some("Succeeded" | "Failed"));
        if unscheduled || finished {
            grace = 0;
        }
        if grace < 0 {
            grace = 1;
        }
        let first = !is_terminating(&pod);
        if !first {
            let current = pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if grace >= current {
                return Ok((pod, Vec::new()));
            }
        }
        let rv = self.next_resource_version();
        let stop_delay = self.behaviour.stop_delay(&pod);
        let scaled_grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0))
            .mul_f64(self.behaviour.time_scale);
        let Some(pod) = self.pods.get_mut(key) else {
            return Err(ApiError::not_found("pods", &key.1));
        };
        pod["metadata"]["deletionTimestamp"] = json!((Utc::now()
            + chrono::Duration::seconds(grace))
        .to_rfc3339_opts(SecondsFormat::Secs, true));
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        pod["metadata"]["resourceVersion"] = json!(rv);
        let deleted = pod.clone();
        self.pod_changed("MODIFIED", deleted.clone());
        let mut timers = Vec::new();
        if first {
            timers.extend(self.replace_if_replicaset(&deleted));
        }
        if grace == 0 {
            // No kubelet to wait for: the registry removes the object in the same request.
            self.remove_pod(key, &uid);
        } else {
            timers.push(Timer::RemovePod {
                key: key.clone(),
                uid,
                after: stop_delay.min(scaled_grace),
            });
        }
        self.observe_pdbs();
        Ok((deleted, timers))
    }

    /// The ReplicaSet controller: a terminating pod it owns is replaced at once by a new pod
    /// (on the spare node, if any) that turns Ready a little later.
    fn replace_if_replicaset(&mut self, pod: &Value) -> Option<Timer> {
        let owner = pod
            .pointer("/metadata/ownerReferences")?
            .as_array()?
            .iter()
            .find(|o| o["kind"] == "ReplicaSet" && o["controller"] == true)?
            .clone();
        let rs = owner["name"].as_str()?.to_owned();
        let ns = str_at(pod, "/metadata/namespace")?.to_owned();
        let suffix = self.uid_counter + 1;
        let name = format!("{rs}-r{suffix:05}");
        let mut replacement = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": pod.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                "ownerReferences": [owner],
            },
            "spec": pod.get("spec").cloned().unwrap_or(json!({})),
            "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]},
        });
        match &self.behaviour.spare_node {
            Some(node) => {
                replacement["spec"]["nodeName"] = json!(node);
                replacement["status"]["phase"] = json!("Running");
            }
            None => {
                if let Some(spec) = replacement["spec"].as_object_mut() {
                    spec.remove("nodeName");
                }
            }
        }
        self.stamp(&mut replacement);
        let uid = str_at(&replacement, "/metadata/uid")
            .unwrap_or_default()
            .to_owned();
        let key = (ns, name);
        let schedulable = self.behaviour.spare_node.is_some();
        self.pods.insert(key.clone(), replacement.clone());
        self.pod_changed("ADDED", replacement);
        schedulable.then_some(Timer::PodReady {
            key,
            uid,
            after: self.behaviour.replacement_ready_delay,
        })
    }

    pub fn remove_pod(&mut self, key: &Key, uid: &str) {
        if self
            .pods
            .get(key)
            .is_some_and(|p| str_at(p, "/metadata/uid") == Some(uid))
        {
            self.next_resource_version();
            if let Some(pod) = self.pods.remove(key) {
                self.pod_changed("DELETED", pod);
            }
            self.observe_pdbs();
        }
    }

    pub fn mark_ready(&mut self, key: &Key, uid: &str) {
        let rv = self.next_resource_version();
        if let Some(pod) = self
            .pods
            .get_mut(key)
            .filter(|p| str_at(p, "/metadata/uid") == Some(uid))
        {
            pod["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
            pod["status"]["phase"] = json!("Running");
            pod["metadata"]["resourceVersion"] = json!(rv);
            let changed = pod.clone();
            self.pod_changed("MODIFIED", changed);
        }
        self.observe_pdbs();
    }

    /// The Eviction subresource's rules (pkg/registry/core/pod/storage/eviction.go).
    pub fn evict(
        &mut self,
        key: &Key,
        grace_seconds: Option<i64>,
        precondition_uid: Option<&str>,
    ) -> Result<Vec<Timer>, ApiError> {
        let pod = self
            .pods
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found("pods", &key.1))?;
        if self.terminating_namespaces.contains(&key.0) {
            return Err(ApiError::namespace_terminating(&key.0, &key.1));
        }
        let phase = str_at(&pod, "/status/phase").unwrap_or("Pending");
        // Pods that are finished, not yet running, or already going need no budget.
        let ignore_budget =
            is_terminating(&pod) || matches!(phase, "Succeeded" | "Failed" | "Pending");
        if !ignore_budget {
            let budgets: Vec<Value> = self
                .pdbs
                .values()
                .filter(|pdb| self.selected(pdb).any(|p| key_of(p) == *key))
                .cloned()
                .collect();
            if budgets.len() > 1 {
                return Err(ApiError::internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ));
            }
            if let Some(pdb) = budgets.first() {
                let (healthy, desired, _) = self.pdb_numbers(pdb);
                let pod_healthy = is_ready(&pod);
                let policy = pdb
                    .pointer("/spec/unhealthyPodEvictionPolicy")
                    .and_then(Value::as_str)
                    .unwrap_or("IfHealthyBudget");
                let allowed = if pod_healthy {
                    healthy - desired > 0
                } else {
                    policy == "AlwaysAllow" || healthy >= desired
                };
                if !allowed {
                    self.record.evictions_refused += 1;
                    let name = str_at(pdb, "/metadata/name").unwrap_or_default();
                    return Err(ApiError::too_many_requests(format!(
                        "The disruption budget {name} needs {desired} healthy pods and has {healthy} currently"
                    )));
                }
            }
        }
        let (_, timers) = self.delete_pod(key, grace_seconds, precondition_uid)?;
        self.record.evictions_accepted += 1;
        self.record.evictions.push(EvictionRecord {
            key: key.clone(),
            grace_seconds,
            at: Instant::now(),
        });
        Ok(timers)
    }

    /// The namespace controller's work when a namespace is deleted: every pod in it is
    /// deleted gracefully. Returns the timers to start.
    pub fn delete_namespace_pods(&mut self, namespace: &str) -> Vec<Timer> {
        let keys: Vec<Key> = self
            .pods
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|key| self.delete_pod(key, None, None).ok())
            .flat_map(|(_, timers)| timers)
            .collect()
    }
}

pub fn key_of(obj: &Value) -> Key {
    (
        str_at(obj, "/metadata/namespace")
            .unwrap_or("default")
            .to_owned(),
        str_at(obj, "/metadata/name").unwrap_or_default().to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "web", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        })
    }

    fn world_with_pdb(spec: Value, pods: usize) -> World {
        let mut w = World::new(Behaviour::default());
        for i in 0..pods {
            w.add_pod(pod(&format!("p{i}"), true));
        }
        w.add_pdb(json!({"metadata": {"name": "web", "namespace": "web"}, "spec": spec}));
        w
    }

    fn key(name: &str) -> Key {
        ("web".to_owned(), name.to_owned())
    }

    #[test]
    fn min_available_refuses_the_eviction_that_would_break_it() {
        let mut w = world_with_pdb(
            json!({"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}),
            2,
        );
        assert!(w.evict(&key("p0"), Some(0), None).is_ok());
        let err = w
            .evict(&key("p1"), Some(0), None)
            .expect_err("budget exhausted");
        assert_eq!(err.code, 429);
        assert_eq!(w.record.pdb_min_healthy[&key("web")], 1);
    }

    #[test]
    fn percentages_round_up_like_the_disruption_controller() {
        // maxUnavailable 50% of 3 rounds up to 2, leaving 1 desired healthy.
        let w = world_with_pdb(
            json!({"maxUnavailable": "50%", "selector": {"matchLabels": {"app": "web"}}}),
            3,
        );
        let pdb = w.pdbs.values().next().cloned().expect("pdb");
        assert_eq!(w.pdb_numbers(&pdb), (3, 1, 3));
        let w = world_with_pdb(
            json!({"minAvailable": "50%", "selector": {"matchLabels": {"app": "web"}}}),
            3,
        );
        let pdb = w.pdbs.values().next().cloned().expect("pdb");
        assert_eq!(w.pdb_numbers(&pdb).1, 2);
    }

    #[test]
    fn two_budgets_on_one_pod_is_a_500() {
        let mut w = world_with_pdb(
            json!({"minAvailable": 0, "selector": {"matchLabels": {"app": "web"}}}),
            2,
        );
        w.add_pdb(json!({"metadata": {"name": "other", "namespace": "web"}, "spec": {"minAvailable": 0, "selector": {}}}));
        assert_eq!(w.evict(&key("p0"), None, None).expect_err("500").code, 500);
    }

    #[test]
    fn a_terminating_namespace_refuses_evictions_with_its_cause() {
        let mut w = world_with_pdb(
            json!({"minAvailable": 0, "selector": {"matchLabels": {"app": "web"}}}),
            1,
        );
        w.terminating_namespaces.insert("web".into());
        let err = w.evict(&key("p0"), None, None).expect_err("403");
        assert_eq!(err.code, 403);
        assert!(err.body().to_string().contains("NamespaceTerminating"));
    }

    #[test]
    fn watches_resume_from_a_resource_version_without_gaps() {
        let mut w = World::new(Behaviour::default());
        w.add_pod(pod("a", true));
        let rv: u64 = w.current_resource_version().parse().expect("number");
        w.add_pod(pod("b", true));
        let (past, _live) = w.watch_from(rv).expect("in history");
        assert_eq!(past.len(), 1);
        assert_eq!(past[0].kind, "ADDED");
        assert_eq!(past[0].object["metadata"]["name"], "b");
    }

    #[test]
    fn grace_runs_on_the_scaled_clock_for_pods_that_ignore_sigterm() {
        let mut w = World::new(Behaviour {
            time_scale: 0.01,
            ..Behaviour::default()
        });
        let mut p = pod("slow", true);
        p["metadata"]["annotations"] = json!({"emulator.nth.dev/stop-delay-ms": "600000"});
        w.add_pod(p);
        let (_, timers) = w
            .delete_pod(&key("slow"), Some(100), None)
            .expect("deleted");
        let Some(Timer::RemovePod { after, .. }) = timers.first() else {
            panic!("no timer")
        };
        assert_eq!(*after, Duration::from_secs(1));
    }

    #[test]
    fn uid_precondition_protects_a_replacement_with_the_same_name() {
        let mut w = world_with_pdb(
            json!({"minAvailable": 0, "selector": {"matchLabels": {"app": "web"}}}),
            1,
        );
        assert_eq!(
            w.evict(&key("p0"), None, Some("not-the-uid"))
                .expect_err("409")
                .code,
            409
        );
    }
}
