//! One pod's eviction through the policy/v1 Eviction subresource, retried while a
//! PodDisruptionBudget (or a transient server error) says no, until the deadline.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use serde_json::json;
use tracing::{debug, warn};

use super::{DrainDeadline, DrainSettings, PodRef};

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// The status cause the NamespaceLifecycle admission plugin gives when a namespace is being
/// deleted: the namespace controller deletes its pods, so the drain waits for them.
const NAMESPACE_TERMINATING: &str = "NamespaceTerminating";

/// How one eviction ended.
pub(super) enum Evicted {
    /// Accepted (or the pod is going anyway): wait for it to be gone.
    Accepted,
    /// Not there any more (404, or a new pod under the same name).
    Gone,
    /// Refused until the deadline, with the last reason.
    Refused(String),
}

/// The grace period to ask for: the pod's own (or the operator's override), clipped so that
/// the pod has stopped by `stopped_by`. `None` leaves the pod's own grace period untouched.
pub(super) fn grace_seconds(
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

/// Posts the Eviction until the API server accepts it, the pod is gone, or the deadline
/// passes. The request is built here rather than through kube's `evict`, whose delete
/// options are not sent under the field name the API expects (`deleteOptions`).
pub(super) async fn evict_until_accepted(
    client: &Client,
    settings: &DrainSettings,
    pod: &Pod,
    id: &PodRef,
    deadline: DrainDeadline,
) -> Evicted {
    loop {
        let grace = grace_seconds(
            pod,
            settings.grace_period_override,
            deadline.pods_stopped_by,
            Utc::now(),
        );
        let reason = match post_eviction(client, id, grace).await {
            Ok(()) => {
                debug!(pod = %id, grace_seconds = ?grace, "eviction accepted");
                return Evicted::Accepted;
            }
            Err(kube::Error::Api(status)) => match status.code {
                404 | 409 => return Evicted::Gone,
                429 => format!("PodDisruptionBudget: {}", status_reason(&status)),
                // More than one PDB selects the pod, or a transient server error; or the token
                // was refused and the next attempt carries a fresh one.
                401 | 500 | 503 | 504 => format!("API server: {}", status_reason(&status)),
                403 if has_cause(&status, NAMESPACE_TERMINATING) => return Evicted::Accepted,
                _ => {
                    return Evicted::Refused(format!("eviction failed: {}", status_reason(&status)))
                }
            },
            Err(error) => format!("eviction request failed: {error}"),
        };
        let next_try = Utc::now()
            + chrono::Duration::from_std(settings.eviction_retry_interval).unwrap_or_default();
        if next_try >= deadline.give_up_at {
            warn!(pod = %id, %reason, "eviction refused until the deadline");
            return Evicted::Refused(reason);
        }
        debug!(pod = %id, %reason, "eviction refused; retrying");
        tokio::time::sleep(settings.eviction_retry_interval).await;
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
        // Past the deadline: stop now.
        assert_eq!(
            grace_seconds(
                &pod(300),
                None,
                Some(now - chrono::Duration::seconds(5)),
                now
            ),
            Some(0)
        );
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
