//! Retries for idempotent API calls (GET, LIST, strategic-merge PATCH, DELETE with a uid
//! precondition) that hit a transient failure: a 5xx, a 429 from API priority and fairness,
//! a dropped connection. Evictions are not retried here: their 429 is a PodDisruptionBudget
//! speaking, and the drain's own loop paces those against the deadline.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

/// Attempts in all: with the backoff below, a call gives up after about 1.4 s of trouble,
/// a small part of the shortest (two-minute) notice, and long enough to ride out an API
/// server restart behind the EKS load balancer.
const ATTEMPTS: u32 = 4;

/// Doubled after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

fn is_transient(error: &kube::Error) -> bool {
    match error {
        // 401: the client's token was refused and has been dropped; the next attempt carries
        // a fresh one. A role without access fails the same way four times, 1.4 s later.
        kube::Error::Api(status) => {
            matches!(status.code, 401 | 429) || (status.code >= 500 && status.code != 501)
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Runs `call` until it succeeds, fails for good, or runs out of attempts.
pub(crate) async fn idempotent<T, F, Fut>(what: &str, mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(error) if attempt < ATTEMPTS && is_transient(&error) => {
                warn!(what, attempt, %error, "transient API error; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "y").with_code(code),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_and_permanent_ones_are_not() {
        let calls = AtomicU32::new(0);
        let result = idempotent("test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(api_error(503))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.ok(), Some(2));

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = idempotent("test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(api_error(403)) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = idempotent("test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(api_error(500)) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS);
    }
}
