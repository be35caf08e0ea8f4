//! The end of an invocation, budgeted from what follows the drain.
//!
//! After the drain come steps that must be done before Lambda's deadline, or Lambda kills
//! the run mid-way (the hook neither completed nor the drain continued) and retries the
//! event: the node's record, the lifecycle completion or the continuation, the webhook
//! notices, the answer to the Runtime API. The drain leaves [`WRAP_UP`] free, and each step
//! is held to its share of it, so that the worst case fits, not only the usual one.
//! Webhook notices get whatever is left before [`ANSWER`]; one still unsent then is dropped.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// The node's record of the drain's end and its Kubernetes Event: two small writes and,
/// rarely, a conflict retry, each a few milliseconds against a healthy API server.
pub const RECORD: Duration = Duration::from_secs(2);

/// One AWS call: CompleteLifecycleAction, or the Invoke that continues the drain. A first
/// attempt answers in well under a second; this leaves room for one SDK retry, not for the
/// SDK's whole operation timeout (16 s), which no invocation end can afford.
pub const AWS_CALL: Duration = Duration::from_secs(3);

/// Logging the report, the metrics line and posting the answer to the Runtime API.
pub const ANSWER: Duration = Duration::from_secs(1);

/// What the drain leaves free at the end of an invocation: the record, then one AWS call,
/// then the answer, one after the other.
pub const WRAP_UP: TimeDelta =
    TimeDelta::seconds((RECORD.as_secs() + AWS_CALL.as_secs() + ANSWER.as_secs()) as i64);

/// A step of the wrap-up that did not finish within its share.
#[derive(Debug, thiserror::Error)]
#[error("{step} did not finish within its {limit:?} share of the invocation's end")]
pub struct Overrun {
    pub step: &'static str,
    pub limit: Duration,
}

/// Runs `step` for at most `limit`.
pub async fn within<F: Future>(
    step: &'static str,
    limit: Duration,
    work: F,
) -> Result<F::Output, Overrun> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| Overrun { step, limit })
}

/// When the answer must be on its way, for an invocation that ends at `end`.
pub fn answer_by(end: DateTime<Utc>) -> DateTime<Utc> {
    end - TimeDelta::from_std(ANSWER).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrap_up_holds_every_step_one_after_the_other() {
        assert_eq!(
            WRAP_UP.to_std().expect("positive"),
            RECORD + AWS_CALL + ANSWER,
            "a step was added or grown without the drain leaving room for it"
        );
    }

    #[tokio::test]
    async fn a_step_past_its_share_is_cut_and_named() {
        let hanging = std::future::pending::<()>();
        let share = Duration::from_millis(20);
        let error = within("CompleteLifecycleAction", share, hanging)
            .await
            .expect_err("a hanging step is cut");
        assert_eq!(
            error.to_string(),
            "CompleteLifecycleAction did not finish within its 20ms share of the invocation's end"
        );
        assert_eq!(within("x", RECORD, async { 7 }).await.expect("in time"), 7);
    }
}
