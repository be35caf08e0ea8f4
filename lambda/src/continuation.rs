//! Drains longer than one invocation. Lambda stops a function after at most 15 minutes; a
//! node whose pods take longer to leave (a PodDisruptionBudget that lets one pod go every few
//! minutes, long grace periods) while its instance still has time — an Auto Scaling hook
//! still pending, a maintenance window days away — is drained on by a fresh invocation of
//! this same function, invoked asynchronously with the event and when the drain began. The
//! chain ends when the drain completes or MAX_DRAIN_SECONDS have passed since it began.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::info;

use crate::eventbridge::EventError;
use crate::signed::{self, SignedCall};

/// The key of the payload a function sends itself to continue; no EventBridge event has it.
pub const CONTINUATION_KEY: &str = "nth-continuation";

/// How far ahead of this invocation's clock a continuation's `started` may be: it was read
/// from an earlier invocation's clock, and Lambda's hosts keep NTP time, so a few seconds of
/// difference are real; more is a forged or corrupt payload, whose drain would never reach
/// MAX_DRAIN_SECONDS.
pub const STARTED_SKEW: TimeDelta = TimeDelta::minutes(5);

/// The most rounds a drain may take. A round lasts one invocation (at most 15 minutes, at
/// least a minute with any sensible timeout), and the templates cap MAX_DRAIN_SECONDS at 48
/// hours: 2,880 one-minute rounds. 10,000 leaves room for shorter timeouts; a longer chain is
/// runaway or forged, and the bound keeps `round + 1` far from overflow.
pub const MAX_ROUNDS: u32 = 10_000;

/// A continuation's first round: round 1 is the invocation that began the drain, which is
/// never carried in a payload.
const FIRST_CONTINUED_ROUND: u32 = 2;

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
    /// The token the node's `<prefix>/drain-continuation-token` annotation holds for this
    /// round (absent in a payload no round of this function sent).
    #[serde(default)]
    pub token: String,
}

/// Bytes of randomness in a continuation token: a guess never lands.
const TOKEN_BYTES: usize = 16;

/// A fresh continuation token, from the operating system's random source.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::getrandom(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Continuation {
    /// The continuation a payload carries; `None` for an EventBridge event.
    pub fn from_payload(payload: &Value) -> Result<Option<Self>, EventError> {
        let Some(value) = payload.get(CONTINUATION_KEY) else {
            return Ok(None);
        };
        let continuation: Self =
            serde_path_to_error::deserialize(value).map_err(|e| EventError::Envelope {
                path: format!("{CONTINUATION_KEY}.{}", e.path()),
                message: e.inner().to_string(),
            })?;
        continuation.check(Utc::now())?;
        Ok(Some(continuation))
    }

    /// Refuses what no invocation of this function sends: a drain that began in the future,
    /// or a round outside 2..=MAX_ROUNDS.
    fn check(&self, now: DateTime<Utc>) -> Result<(), EventError> {
        let refuse = |field: &str, message: String| EventError::Continuation {
            instance_id: self.instance_id.clone(),
            path: format!("{CONTINUATION_KEY}.{field}"),
            message,
        };
        if self.started.signed_duration_since(now) > STARTED_SKEW {
            return Err(refuse(
                "started",
                format!(
                    "{} is in the future (this invocation's clock: {}); a drain cannot have begun then",
                    self.started.to_rfc3339(),
                    now.to_rfc3339()
                ),
            ));
        }
        if !(FIRST_CONTINUED_ROUND..=MAX_ROUNDS).contains(&self.round) {
            return Err(refuse(
                "round",
                format!(
                    "{} is outside {FIRST_CONTINUED_ROUND}..={MAX_ROUNDS}",
                    self.round
                ),
            ));
        }
        Ok(())
    }

    pub fn payload(&self) -> Value {
        serde_json::json!({ CONTINUATION_KEY: self })
    }
}

/// When a drain that began at `started` must end: MAX_DRAIN_SECONDS (`max_drain`) later. A
/// limit past chrono's last representable time (a huge MAX_DRAIN_SECONDS) is no limit.
pub fn drain_limit(started: DateTime<Utc>, max_drain: TimeDelta) -> DateTime<Utc> {
    started
        .checked_add_signed(max_drain)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
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
            token: new_token().expect("a random source"),
        };
        assert_eq!(next.token.len(), 32);
        assert_ne!(next.token, new_token().expect("a random source"));
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

    fn payload(started: &str, round: u32) -> Value {
        serde_json::json!({ CONTINUATION_KEY: {
            "event": {"id": "e1"}, "instance_id": "i-0123456789abcdef0",
            "started": started, "round": round,
        }})
    }

    #[test]
    fn a_continuation_from_the_future_or_beyond_the_rounds_is_refused() {
        for (started, round, field, value) in [
            ("+262142-12-31T23:59:59Z", 2, "started", "262142"),
            ("2999-01-01T00:00:00Z", 2, "started", "2999"),
            ("2026-11-25T10:00:00Z", 0, "round", "0"),
            ("2026-11-25T10:00:00Z", 1, "round", "1"),
            ("2026-11-25T10:00:00Z", MAX_ROUNDS + 1, "round", "10001"),
            ("2026-11-25T10:00:00Z", u32::MAX, "round", "4294967295"),
        ] {
            let err = Continuation::from_payload(&payload(started, round))
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains(&format!("nth-continuation.{field}"))
                    && err.contains(value)
                    && err.contains("i-0123456789abcdef0"),
                "{err}"
            );
        }
        let now = Utc::now();
        let slightly_ahead = (now + TimeDelta::seconds(30)).to_rfc3339();
        assert!(Continuation::from_payload(&payload(&slightly_ahead, 2)).is_ok());
        // Long ago is not refused: the drain's limit has passed, and the chain ends.
        for started in ["-262143-01-01T00:00:00Z", "0000-01-01T00:00:00Z"] {
            let c = Continuation::from_payload(&payload(started, MAX_ROUNDS))
                .expect("accepted")
                .expect("a continuation");
            assert!(drain_limit(c.started, TimeDelta::hours(1)) < now);
        }
    }

    #[test]
    fn a_drain_limit_beyond_chrono_is_no_limit() {
        let now = Utc::now();
        assert_eq!(drain_limit(now, TimeDelta::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            drain_limit(DateTime::<Utc>::MAX_UTC, TimeDelta::hours(1)),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(
            drain_limit(now, TimeDelta::hours(1)),
            now + TimeDelta::hours(1)
        );
    }
}
