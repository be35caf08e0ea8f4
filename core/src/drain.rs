//! The drain: evict every pod that `kubectl drain` would, through the Eviction API so that
//! PodDisruptionBudgets are honoured, and wait until they are gone, all before a deadline.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::json;
use tracing::{debug, info, instrument, warn};

/// Between two eviction attempts refused by a PodDisruptionBudget (429). `kubectl drain` waits
/// 5 s too: long enough for a replacement pod to turn Ready and free a disruption, short
/// enough that a two-minute Spot notice allows some twenty tries.
pub const EVICTION_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Between two looks at the node's pods while waiting for evicted ones to go: one LIST per
/// interval for the whole node, however many pods it has.
pub const GONE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Evictions in flight at once. Each is one small request; 16 drains a 110-pod node in a few
/// round trips without flooding the API server's priority-and-fairness queues.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Page size when listing a node's pods (a node runs at most 110 by default, up to 737 on
/// large instances with prefix delegation).
const POD_LIST_PAGE: u32 = 250;

/// Pods at or above this priority are system-critical (`system-cluster-critical` is
/// 2,000,000,000, `system-node-critical` 2,000,001,000): evicted after everything else, as
/// the node needs its DNS and networking until its workloads have moved.
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;

#[derive(Debug, Clone)]
pub struct DrainSettings {
    pub concurrency: usize,
    pub eviction_retry_interval: Duration,
    pub poll_interval: Duration,
    /// Replaces every pod's own grace period, as NTH's POD_TERMINATION_GRACE_PERIOD does.
    pub grace_period_override: Option<i64>,
    pub dry_run: bool,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            eviction_retry_interval: EVICTION_RETRY_INTERVAL,
            poll_interval: GONE_POLL_INTERVAL,
            grace_period_override: None,
            dry_run: false,
        }
    }
}

/// When the drain must be over.
#[derive(Debug, Clone, Copy)]
pub struct DrainDeadline {
    /// Pods must have stopped by then: their grace periods are clipped to end before it.
    /// `None` when the instance's end is not known (the pods keep their own grace).
    pub pods_stopped_by: Option<DateTime<Utc>>,
    /// Retries and waiting stop here (the invocation's own end, or the instance's).
    pub give_up_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("listing pods on node {node}: {source}")]
    ListPods {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// A pod, as the report names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(skip)]
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PodNote {
    pub pod: String,
    pub reason: String,
}

/// What a drain did, logged as one JSON object and returned to the caller.
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    pub node: String,
    pub dry_run: bool,
    /// Evicted and confirmed gone (or, in a dry run, would be evicted).
    pub evicted: Vec<String>,
    /// Finished (Succeeded/Failed) pods deleted.
    pub deleted: Vec<String>,
    pub skipped: Vec<PodNote>,
    /// Still on the node when the drain ended, and why.
    pub left: Vec<PodNote>,
    pub duration_ms: u64,
    /// All pods gone before the deadline.
    pub complete: bool,
}

/// What the drain does with one pod, as `kubectl drain` decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Disposition {
    Skip(&'static str),
    /// Already terminating: wait for it, do not evict again.
    Wait,
    /// Finished: nothing to disrupt, delete it.
    Delete,
    Evict,
}

fn disposition(pod: &Pod) -> Disposition {
    let meta = &pod.metadata;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    {
        return Disposition::Skip("mirror pod (managed by the kubelet)");
    }
    if meta.owner_references.as_ref().is_some_and(|owners| {
        owners
            .iter()
            .any(|o| o.controller == Some(true) && o.kind == "DaemonSet")
    }) {
        return Disposition::Skip("DaemonSet pod");
    }
    if meta.deletion_timestamp.is_some() {
        return Disposition::Wait;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Disposition::Delete;
    }
    Disposition::Evict
}

fn is_system_critical(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.priority)
        .is_some_and(|p| p >= SYSTEM_CRITICAL_PRIORITY)
        || spec
            .and_then(|s| s.priority_class_name.as_deref())
            .is_some_and(|c| c == "system-cluster-critical" || c == "system-node-critical")
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    }
}

/// The grace period to ask for: the pod's own (or the operator's override), clipped so that
/// the pod has stopped by `stopped_by`. `None` leaves the pod's own grace period untouched.
fn grace_seconds(
    pod: &Pod,
    override_seconds: Option<i64>,
    stopped_by: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<i64> {
    let own = override_seconds.unwrap_or_else(|| {
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE_SECONDS)
    });
    match stopped_by {
        Some(limit) => {
            let left = (limit - now).num_seconds().max(0);
            (own > left || override_seconds.is_some()).then_some(own.min(left))
        }
        None => override_seconds,
    }
}

/// How one eviction ended.
enum Evicted {
    /// Accepted: the pod is terminating.
    Accepted,
    /// Not there any more (404, or a new pod under the same name).
    Gone,
    /// Refused until the deadline, with the last reason.
    Refused(String),
}

#[derive(Clone)]
pub struct Drainer {
    client: Client,
    settings: DrainSettings,
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Drainer {
    pub fn new(client: Client, settings: DrainSettings) -> Self {
        Self { client, settings }
    }

    #[instrument(skip(self, deadline), fields(node = %node))]
    pub async fn drain(
        &self,
        node: &str,
        deadline: DrainDeadline,
    ) -> Result<DrainReport, DrainError> {
        let started = std::time::Instant::now();
        let pods = self.list_node_pods(node).await?;
        let mut report = DrainReport {
            node: node.to_owned(),
            dry_run: self.settings.dry_run,
            evicted: Vec::new(),
            deleted: Vec::new(),
            skipped: Vec::new(),
            left: Vec::new(),
            duration_ms: 0,
            complete: false,
        };

        let mut to_wait: Vec<PodRef> = Vec::new();
        let mut to_evict: Vec<Pod> = Vec::new();
        for pod in pods {
            let id = pod_ref(&pod);
            match disposition(&pod) {
                Disposition::Skip(why) => report.skipped.push(PodNote {
                    pod: id.to_string(),
                    reason: why.to_owned(),
                }),
                Disposition::Wait => to_wait.push(id),
                Disposition::Delete => {
                    if self.delete_finished(&id).await {
                        report.deleted.push(id.to_string());
                    } else {
                        report.left.push(PodNote {
                            pod: id.to_string(),
                            reason: "finished pod could not be deleted".into(),
                        });
                    }
                }
                Disposition::Evict => to_evict.push(pod),
            }
        }

        if self.settings.dry_run {
            report.evicted = to_evict.iter().map(|p| pod_ref(p).to_string()).collect();
            report.complete = true;
            report.duration_ms = elapsed_ms(started);
            info!(report = %json!(report), "dry run: drain planned, nothing evicted");
            return Ok(report);
        }

        // Ordinary workloads first; the node's DNS and networking pods go last.
        let (critical, ordinary): (Vec<Pod>, Vec<Pod>) =
            to_evict.into_iter().partition(is_system_critical);
        for wave in [ordinary, critical] {
            let outcomes: Vec<(PodRef, Evicted)> = futures::stream::iter(wave)
                .map(|pod| async move {
                    let id = pod_ref(&pod);
                    let outcome = self.evict_until_accepted(&pod, &id, deadline).await;
                    (id, outcome)
                })
                .buffer_unordered(self.settings.concurrency.max(1))
                .collect()
                .await;
            for (id, outcome) in outcomes {
                match outcome {
                    Evicted::Accepted => to_wait.push(id),
                    Evicted::Gone => report.evicted.push(id.to_string()),
                    Evicted::Refused(reason) => report.left.push(PodNote {
                        pod: id.to_string(),
                        reason,
                    }),
                }
            }
        }

        let (gone, still_there) = self.wait_until_gone(node, to_wait, deadline).await?;
        report.evicted.extend(gone.iter().map(ToString::to_string));
        report
            .left
            .extend(still_there.into_iter().map(|id| PodNote {
                pod: id.to_string(),
                reason: "still terminating when the drain deadline passed".into(),
            }));
        report.complete = report.left.is_empty();
        report.duration_ms = elapsed_ms(started);
        let (evicted, left) = (report.evicted.len(), report.left.len());
        if report.complete {
            info!(evicted, left, duration_ms = report.duration_ms, report = %json!(report), "drain complete");
        } else {
            warn!(evicted, left, duration_ms = report.duration_ms, report = %json!(report), "drain incomplete: pods left on the node");
        }
        Ok(report)
    }

    async fn list_node_pods(&self, node: &str) -> Result<Vec<Pod>, DrainError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let mut params = ListParams::default()
            .fields(&format!("spec.nodeName={node}"))
            .limit(POD_LIST_PAGE);
        let mut all = Vec::new();
        loop {
            let page = pods
                .list(&params)
                .await
                .map_err(|source| DrainError::ListPods {
                    node: node.to_owned(),
                    source,
                })?;
            all.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(all),
            }
        }
    }

    async fn delete_finished(&self, id: &PodRef) -> bool {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &id.namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(id.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&id.name, &params).await {
            Ok(_) => true,
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => true,
            Err(error) => {
                warn!(pod = %id, %error, "deleting finished pod failed");
                false
            }
        }
    }

    /// Posts the Eviction until the API server accepts it, the pod is gone, or the deadline
    /// passes. The request is built here rather than through kube's `evict`, whose delete
    /// options are not sent under the field name the API expects (`deleteOptions`).
    #[instrument(skip(self, pod, deadline), fields(pod = %id))]
    async fn evict_until_accepted(
        &self,
        pod: &Pod,
        id: &PodRef,
        deadline: DrainDeadline,
    ) -> Evicted {
        loop {
            let grace = grace_seconds(
                pod,
                self.settings.grace_period_override,
                deadline.pods_stopped_by,
                Utc::now(),
            );
            let mut delete_options = json!({ "preconditions": { "uid": id.uid } });
            if let Some(seconds) = grace {
                delete_options["gracePeriodSeconds"] = json!(seconds);
            }
            let body = json!({
                "apiVersion": "policy/v1",
                "kind": "Eviction",
                "metadata": { "name": id.name, "namespace": id.namespace },
                "deleteOptions": delete_options,
            });
            let reason = match self.post_eviction(id, &body).await {
                Ok(()) => {
                    debug!(grace_seconds = ?grace, "eviction accepted");
                    return Evicted::Accepted;
                }
                Err(kube::Error::Api(status)) => match status.code {
                    404 | 409 => return Evicted::Gone,
                    429 => format!("PodDisruptionBudget: {}", status_reason(&status)),
                    // More than one PDB selects the pod, or a transient server error.
                    500 | 503 | 504 => format!("API server: {}", status_reason(&status)),
                    // A terminating namespace refuses evictions; its pods are going anyway.
                    403 if status.message.contains("terminat") => return Evicted::Accepted,
                    _ => {
                        return Evicted::Refused(format!(
                            "eviction failed: {}",
                            status_reason(&status)
                        ))
                    }
                },
                Err(error) => format!("eviction request failed: {error}"),
            };
            let next_try = Utc::now()
                + chrono::Duration::from_std(self.settings.eviction_retry_interval)
                    .unwrap_or_default();
            if next_try >= deadline.give_up_at {
                warn!(%reason, "eviction refused until the deadline");
                return Evicted::Refused(reason);
            }
            debug!(%reason, "eviction refused; retrying");
            tokio::time::sleep(self.settings.eviction_retry_interval).await;
        }
    }

    async fn post_eviction(
        &self,
        id: &PodRef,
        body: &serde_json::Value,
    ) -> Result<(), kube::Error> {
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{}/eviction",
            id.namespace, id.name
        );
        let request = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body).map_err(kube::Error::SerdeError)?)
            .map_err(kube::Error::HttpError)?;
        self.client.request_text(request).await.map(drop)
    }

    /// Waits until every pod is gone from the node (absent, or replaced by a pod with a new
    /// UID), looking at all of them with one LIST per poll interval.
    async fn wait_until_gone(
        &self,
        node: &str,
        mut waiting: Vec<PodRef>,
        deadline: DrainDeadline,
    ) -> Result<(Vec<PodRef>, Vec<PodRef>), DrainError> {
        let mut gone = Vec::new();
        while !waiting.is_empty() {
            let present: HashMap<(String, String), String> = self
                .list_node_pods(node)
                .await?
                .iter()
                .map(|p| {
                    let id = pod_ref(p);
                    ((id.namespace, id.name), id.uid)
                })
                .collect();
            let (now_gone, still): (Vec<PodRef>, Vec<PodRef>) =
                waiting.into_iter().partition(|id| {
                    present.get(&(id.namespace.clone(), id.name.clone())) != Some(&id.uid)
                });
            gone.extend(now_gone);
            waiting = still;
            if waiting.is_empty() || Utc::now() >= deadline.give_up_at {
                break;
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
        Ok((gone, waiting))
    }
}

fn status_reason(status: &kube::core::Status) -> String {
    let causes: Vec<&str> = status
        .details
        .as_ref()
        .map(|d| d.causes.iter().map(|c| c.message.as_str()).collect())
        .unwrap_or_default();
    if causes.is_empty() {
        status.message.clone()
    } else {
        format!("{} ({})", status.message, causes.join("; "))
    }
}

fn elapsed_ms(started: std::time::Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("test pod is valid")
    }

    #[test]
    fn kubectl_drain_skips_mirror_and_daemonset_pods() {
        let mirror = pod(
            json!({"metadata": {"name": "kube-proxy-x", "annotations": {"kubernetes.io/config.mirror": "abc"}}}),
        );
        let ds = pod(
            json!({"metadata": {"name": "aws-node-x", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "aws-node", "uid": "u", "controller": true}]}}),
        );
        let rs = pod(
            json!({"metadata": {"name": "web-x", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "u", "controller": true}]}}),
        );
        assert!(matches!(disposition(&mirror), Disposition::Skip(_)));
        assert!(matches!(disposition(&ds), Disposition::Skip(_)));
        assert_eq!(disposition(&rs), Disposition::Evict);
    }

    #[test]
    fn terminating_pods_are_waited_for_and_finished_ones_deleted() {
        let terminating =
            pod(json!({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"}}));
        let done = pod(json!({"metadata": {"name": "b"}, "status": {"phase": "Succeeded"}}));
        assert_eq!(disposition(&terminating), Disposition::Wait);
        assert_eq!(disposition(&done), Disposition::Delete);
    }

    #[test]
    fn grace_is_clipped_to_end_before_the_instance() {
        let now = Utc::now();
        let p = pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": [], "terminationGracePeriodSeconds": 300}}),
        );
        let limit = now + chrono::Duration::seconds(90);
        assert_eq!(grace_seconds(&p, None, Some(limit), now), Some(90));
        // A pod whose own grace fits is left alone.
        let short = pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": [], "terminationGracePeriodSeconds": 10}}),
        );
        assert_eq!(grace_seconds(&short, None, Some(limit), now), None);
        // Past the deadline: stop now.
        assert_eq!(
            grace_seconds(&p, None, Some(now - chrono::Duration::seconds(5)), now),
            Some(0)
        );
        // No known end: the operator's override, else the pod's own.
        assert_eq!(grace_seconds(&p, Some(20), None, now), Some(20));
        assert_eq!(grace_seconds(&p, None, None, now), None);
    }

    #[test]
    fn system_critical_pods_are_recognised_by_class_or_priority() {
        let by_class = pod(
            json!({"metadata": {"name": "coredns"}, "spec": {"containers": [], "priorityClassName": "system-cluster-critical"}}),
        );
        let by_value = pod(
            json!({"metadata": {"name": "x"}, "spec": {"containers": [], "priority": 2000001000}}),
        );
        let ordinary =
            pod(json!({"metadata": {"name": "web"}, "spec": {"containers": [], "priority": 0}}));
        assert!(is_system_critical(&by_class));
        assert!(is_system_critical(&by_value));
        assert!(!is_system_critical(&ordinary));
    }
}
