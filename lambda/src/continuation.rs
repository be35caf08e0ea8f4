//! Drains longer than one invocation. Lambda stops a function after at most 15 minutes; a
//! node whose pods take longer to leave (a PodDisruptionBudget that lets one pod go every few
//! minutes, long grace periods) while its instance still has time — an Auto Scaling hook
//! still pending, a maintenance window days away — is drained on by a fresh invocation of
//! this same function, invoked asynchronously with the event and when the drain began. The
//! chain ends when the drain completes or MAX_DRAIN_SECONDS have passed since it began.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::info;

use crate::eventbridge::EventError;
use crate::signed::{self, SignedCall};

/// The key of the payload a function sends itself to continue; no EventBridge event has it.
pub const CONTINUATION_KEY: &str = "nth-continuation";

/// A drain carried over from an earlier invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Continuation {
    /// The EventBridge event as first delivered.
    pub event: Value,
    /// The instance whose drain continues; the event's other interruptions are not redone.
    pub instance_id: String,
    /// When the first invocation began draining: MAX_DRAIN_SECONDS count from here.
    pub started: DateTime<Utc>,
    /// 1 for the first invocation, 2 for the first continuation, ...
    pub round: u32,
}

impl Continuation {
    /// The continuation a payload carries; `None` for an EventBridge event.
    pub fn from_payload(payload: &Value) -> Result<Option<Self>, EventError> {
        let Some(value) = payload.get(CONTINUATION_KEY) else {
            return Ok(None);
        };
        serde_path_to_error::deserialize(value)
            .map(Some)
            .map_err(|e| EventError::Envelope {
                path: format!("{CONTINUATION_KEY}.{}", e.path()),
                message: e.inner().to_string(),
            })
    }

    pub fn payload(&self) -> Value {
        serde_json::json!({ CONTINUATION_KEY: self })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invoking {function} to continue the drain of instance {instance_id} (event {event_id}, round {round}): {message}")]
pub struct ContinueError {
    function: String,
    instance_id: String,
    event_id: String,
    round: u32,
    message: String,
}

/// Sends `next` to `function` (this function's own ARN) as an asynchronous invocation.
pub async fn invoke(
    aws: &aws_config::SdkConfig,
    function: &str,
    next: &Continuation,
) -> Result<(), ContinueError> {
    let error = |message: String| ContinueError {
        function: function.to_owned(),
        instance_id: next.instance_id.clone(),
        event_id: next
            .event
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        round: next.round,
        message,
    };
    let path = format!(
        "/2015-03-31/functions/{}/invocations",
        signed::path_segment(function)
    );
    let answer = signed::send(
        aws,
        SignedCall {
            action: "lambda:InvokeFunction",
            service: "lambda",
            method: "POST",
            path: &path,
            headers: &[
                ("content-type", "application/json"),
                ("x-amz-invocation-type", "Event"),
            ],
            body: next.payload().to_string(),
        },
    )
    .await
    .map_err(error)?;
    // An asynchronous invocation is accepted with 202 and queued by Lambda.
    if answer.status != http::StatusCode::ACCEPTED {
        return Err(error(answer.error()));
    }
    info!(round = next.round, "drain continues in a new invocation");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuation_survives_the_round_trip_and_events_are_not_continuations() {
        let next = Continuation {
            event: serde_json::json!({"id": "e1", "detail": {}}),
            instance_id: "i-1".into(),
            started: "2026-11-25T10:00:00Z".parse().expect("time"),
            round: 2,
        };
        assert_eq!(
            Continuation::from_payload(&next.payload()).expect("valid"),
            Some(next)
        );
        assert_eq!(
            Continuation::from_payload(&serde_json::json!({"id": "e1"})).expect("valid"),
            None
        );
        let bad = serde_json::json!({ CONTINUATION_KEY: {"event": {}, "instance_id": "i-1", "started": "soon", "round": 2} });
        let err = Continuation::from_payload(&bad)
            .expect_err("bad time")
            .to_string();
        assert!(err.contains("nth-continuation.started"), "{err}");
    }
}
