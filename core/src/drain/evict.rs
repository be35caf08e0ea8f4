//! One eviction attempt through the policy/v1 Eviction subresource, and what its answer
//! means for the drain; [`super::schedule`] decides when to try again.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use serde_json::json;

use super::PodRef;

/// Kubernetes' default `terminationGracePeriodSeconds`.
pub(super) const DEFAULT_GRACE_SECONDS: i64 = 30;

/// The shortest grace period asked for, unless the operator forces 0: an Eviction with
/// `gracePeriodSeconds: 0` deletes the pod object at once while its containers may still
/// run, so a StatefulSet can start the same identity elsewhere. `kubectl drain` turns 0
/// into 1 unless `--force` for the same reason.
pub(super) const MIN_GRACE_SECONDS: i64 = 1;

/// The status cause the NamespaceLifecycle admission plugin gives when a namespace is being
/// deleted: the namespace controller deletes its pods, so the drain waits for them.
const NAMESPACE_TERMINATING: &str = "NamespaceTerminating";

/// How one eviction attempt ended.
pub(super) enum Attempt {
    /// Accepted (or the pod is going anyway): wait for it to be gone.
    Accepted,
    /// Not there any more (404, or a new pod under the same name).
    Gone,
    /// A PodDisruptionBudget said no (429): try again when it allows.
    Budget(String),
    /// The API server could not answer (5xx, a refused token, a dropped connection): try
    /// again after the retry interval.
    Transient(String),
    /// Refused for a reason trying again will not change.
    Failed(String),
}

/// The pod's own grace period (or the operator's override).
pub(super) fn own_grace(pod: &Pod, override_seconds: Option<i64>) -> i64 {
    override_seconds.unwrap_or_else(|| {
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE_SECONDS)
    })
}

/// The grace period to ask for: the pod's own (or the operator's override), clipped so that
/// the pod has stopped by `stopped_by`, but never below [`MIN_GRACE_SECONDS`] unless the
/// operator's override is 0. `None` leaves the pod's own grace period untouched.
pub(super) fn grace_seconds(
    pod: &Pod,
    override_seconds: Option<i64>,
    stopped_by: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<i64> {
    let own = own_grace(pod, override_seconds);
    let floor = if override_seconds == Some(0) {
        0
    } else {
        MIN_GRACE_SECONDS
    };
    match stopped_by {
        Some(limit) => {
            let left = (limit - now).num_seconds().max(floor);
            (own > left || override_seconds.is_some()).then_some(own.min(left))
        }
        None => override_seconds,
    }
}

/// Posts the Eviction once.
pub(super) async fn attempt(client: &Client, id: &PodRef, grace: Option<i64>) -> Attempt {
    match post_eviction(client, id, grace).await {
        Ok(()) => Attempt::Accepted,
        Err(kube::Error::Api(status)) => match status.code {
            404 | 409 => Attempt::Gone,
            429 => Attempt::Budget(format!("PodDisruptionBudget: {}", status_reason(&status))),
            // More than one PDB selects the pod, or a transient server error; or the token
            // was refused and the next attempt carries a fresh one.
            401 | 500 | 503 | 504 => {
                Attempt::Transient(format!("API server: {}", status_reason(&status)))
            }
            403 if has_cause(&status, NAMESPACE_TERMINATING) => Attempt::Accepted,
            _ => Attempt::Failed(format!("eviction failed: {}", status_reason(&status))),
        },
        Err(error) => Attempt::Transient(format!("eviction request failed: {error}")),
    }
}

async fn post_eviction(
    client: &Client,
    id: &PodRef,
    grace: Option<i64>,
) -> Result<(), kube::Error> {
    // The uid precondition makes sure a new pod that took the same name is never evicted.
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
    let uri = format!(
        "/api/v1/namespaces/{}/pods/{}/eviction",
        id.namespace, id.name
    );
    let request = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&body).map_err(kube::Error::SerdeError)?)
        .map_err(kube::Error::HttpError)?;
    client.request_text(request).await.map(drop)
}

fn has_cause(status: &kube::core::Status, reason: &str) -> bool {
    status
        .details
        .as_ref()
        .is_some_and(|d| d.causes.iter().any(|c| c.reason == reason))
}

/// The server's message and its causes (for a 429, the PDB that refused and its numbers).
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(grace: i64) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "a"}, "spec": {"containers": [], "terminationGracePeriodSeconds": grace}}))
            .expect("valid")
    }

    #[test]
    fn grace_is_clipped_to_end_before_the_instance() {
        let now = Utc::now();
        let limit = now + chrono::Duration::seconds(90);
        assert_eq!(grace_seconds(&pod(300), None, Some(limit), now), Some(90));
        // A pod whose own grace fits is left alone.
        assert_eq!(grace_seconds(&pod(10), None, Some(limit), now), None);
        // Past the deadline: as soon as possible, but never a forced delete.
        let past = Some(now - chrono::Duration::seconds(5));
        assert_eq!(grace_seconds(&pod(300), None, past, now), Some(1));
        assert_eq!(grace_seconds(&pod(300), Some(30), past, now), Some(1));
        // Only the operator's explicit 0 forces it.
        assert_eq!(grace_seconds(&pod(300), Some(0), past, now), Some(0));
        // No known end: the operator's override, else the pod's own.
        assert_eq!(grace_seconds(&pod(300), Some(20), None, now), Some(20));
        assert_eq!(grace_seconds(&pod(300), None, None, now), None);
        // The override is clipped too.
        assert_eq!(
            grace_seconds(&pod(300), Some(200), Some(limit), now),
            Some(90)
        );
    }
}
