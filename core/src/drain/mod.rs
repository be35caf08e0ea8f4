//! The drain: evict every pod that `kubectl drain` would, through the Eviction API so that
//! PodDisruptionBudgets are honoured, and wait until they are gone, all before a deadline.

mod budgets;
mod evict;
mod schedule;
mod select;
mod wait;

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::json;
use tracing::{info, instrument, warn};

use select::{disposition, is_system_critical, Disposition};

pub use schedule::GraceNote;

/// Between two eviction attempts refused by a PodDisruptionBudget (429) when no budget watch
/// says when to try again, and after a transient error. `kubectl drain` waits 5 s too: long
/// enough for a replacement pod to turn Ready and free a disruption, short enough that a
/// two-minute Spot notice allows some twenty tries.
pub const EVICTION_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// After a failed LIST or WATCH while waiting for pods to go, before trying again.
pub const WAIT_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Evictions in flight at once. Each is one small request; 16 drains a 110-pod node in a few
/// round trips without flooding the API server's priority-and-fairness queues.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Page size when listing a node's pods (a node runs at most 110 by default, up to 737 on
/// large instances with prefix delegation).
const POD_LIST_PAGE: u32 = 250;

#[derive(Debug, Clone)]
pub struct DrainSettings {
    pub concurrency: usize,
    pub eviction_retry_interval: Duration,
    pub wait_retry_pause: Duration,
    /// Replaces every pod's own grace period, as NTH's POD_TERMINATION_GRACE_PERIOD does.
    pub grace_period_override: Option<i64>,
    /// Evict pods with emptyDir volumes (their scratch data is lost), as NTH does by default.
    pub evict_emptydir: bool,
    /// Evict pods no controller would recreate (`kubectl drain --force`).
    pub evict_unmanaged: bool,
    /// Pods in these namespaces are left alone.
    pub exclude_namespaces: Vec<String>,
    /// Pods carrying all of these labels are left alone (e.g. nth's own agent).
    pub exclude_pod_labels: Vec<(String, String)>,
    pub dry_run: bool,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            eviction_retry_interval: EVICTION_RETRY_INTERVAL,
            wait_retry_pause: WAIT_RETRY_PAUSE,
            grace_period_override: None,
            evict_emptydir: true,
            evict_unmanaged: true,
            exclude_namespaces: Vec::new(),
            exclude_pod_labels: Vec::new(),
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

impl DrainError {
    /// Would trying again later likely succeed? A refused token or permission (401, 403)
    /// and a node that is gone (404) would be refused again; anything else (a 5xx, a 429
    /// from API priority and fairness, a dropped connection) is the API server's trouble.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::ListPods { source, .. } => !matches!(
                source,
                kube::Error::Api(status) if matches!(status.code, 401 | 403 | 404)
            ),
        }
    }
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
    /// The budget that refused the pod's eviction (`namespace/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// How many times its budget refused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusals: Option<u32>,
    /// When that budget last allowed an eviction, as far as the drain saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_last_allowed: Option<DateTime<Utc>>,
}

impl PodNote {
    pub(crate) fn new(pod: &impl std::fmt::Display, reason: String) -> Self {
        Self {
            pod: pod.to_string(),
            reason,
            budget: None,
            refusals: None,
            budget_last_allowed: None,
        }
    }
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
    /// Pods whose grace period was shortened to end before the instance does.
    pub grace_clipped: Vec<GraceNote>,
    pub duration_ms: u64,
    /// When pods had to be gone: the instance's end less a margin, else the drain's own limit.
    pub deadline: DateTime<Utc>,
    /// Every pod gone before the deadline.
    pub complete: bool,
}

pub(crate) fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    }
}

/// All pods on the node (paginated) and the list's resourceVersion, to watch from.
pub(crate) async fn list_node_pods(
    client: &Client,
    node: &str,
) -> Result<(Vec<Pod>, String), DrainError> {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut params = ListParams::default()
        .fields(&format!("spec.nodeName={node}"))
        .limit(POD_LIST_PAGE);
    let mut all = Vec::new();
    loop {
        let page = crate::retry::idempotent("list pods", || pods.list(&params))
            .await
            .map_err(|source| DrainError::ListPods {
                node: node.to_owned(),
                source,
            })?;
        all.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok((all, page.metadata.resource_version.unwrap_or_default())),
        }
    }
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
        let (pods, listed_at) = list_node_pods(&self.client, node).await?;
        let mut report = DrainReport {
            node: node.to_owned(),
            dry_run: self.settings.dry_run,
            evicted: Vec::new(),
            deleted: Vec::new(),
            skipped: Vec::new(),
            left: Vec::new(),
            grace_clipped: Vec::new(),
            duration_ms: 0,
            deadline: deadline.pods_stopped_by.unwrap_or(deadline.give_up_at),
            complete: false,
        };

        let mut to_wait: Vec<PodRef> = Vec::new();
        let mut to_evict: Vec<Pod> = Vec::new();
        for pod in pods {
            let id = pod_ref(&pod);
            match disposition(&pod, &self.settings) {
                Disposition::Skip(reason) => report.skipped.push(PodNote::new(&id, reason)),
                Disposition::Wait => to_wait.push(id),
                Disposition::Delete if self.settings.dry_run => report.deleted.push(id.to_string()),
                Disposition::Delete => {
                    if self.delete_finished(&id).await {
                        report.deleted.push(id.to_string());
                    } else {
                        report.left.push(PodNote::new(
                            &id,
                            "finished pod could not be deleted".into(),
                        ));
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
        let evictions =
            schedule::evict_all(&self.client, &self.settings, ordinary, critical, deadline).await;
        to_wait.extend(evictions.accepted);
        report
            .evicted
            .extend(evictions.gone.iter().map(ToString::to_string));
        report.left.extend(evictions.left);
        report.grace_clipped = evictions.clipped;

        let (gone, still_there) = wait::wait_until_gone(
            &self.client,
            node,
            to_wait,
            listed_at,
            deadline.give_up_at,
            self.settings.wait_retry_pause,
        )
        .await?;
        report.evicted.extend(gone.iter().map(ToString::to_string));
        report.left.extend(still_there.into_iter().map(|id| {
            PodNote::new(
                &id,
                "still terminating when the drain deadline passed".into(),
            )
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

    async fn delete_finished(&self, id: &PodRef) -> bool {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &id.namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(id.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        // The uid precondition makes a repeated delete harmless.
        match crate::retry::idempotent("delete pod", || pods.delete(&id.name, &params)).await {
            Ok(_) => true,
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => true,
            Err(error) => {
                warn!(pod = %id, %error, "deleting finished pod failed");
                false
            }
        }
    }
}

fn elapsed_ms(started: std::time::Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}
