//! The agent's counters and the HTTP server for `/healthz` and `/metrics` (Prometheus text).
//! Two fixed endpoints do not need a web framework: hyper alone keeps the binary small.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

/// Where an error came from, for `nth_agent_errors_total{source}`.
#[derive(Debug, Clone, Copy)]
pub enum ErrorSource {
    Imds,
    Kubernetes,
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// (kind, outcome) -> count.
    actions: Mutex<BTreeMap<(String, String), u64>>,
    imds_errors: AtomicU64,
    kubernetes_errors: AtomicU64,
    /// Unix seconds of the last poll in which IMDS answered every request; 0 before the first.
    last_poll: AtomicU64,
}

impl Metrics {
    pub fn action(&self, kind: &str, outcome: &str) {
        let mut actions = self
            .actions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *actions
            .entry((kind.to_owned(), outcome.to_owned()))
            .or_default() += 1;
    }

    pub fn error(&self, source: ErrorSource) {
        match source {
            ErrorSource::Imds => &self.imds_errors,
            ErrorSource::Kubernetes => &self.kubernetes_errors,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn polled(&self, at: chrono::DateTime<chrono::Utc>) {
        self.last_poll.store(
            u64::try_from(at.timestamp()).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP nth_agent_actions_total Notices acted on, by kind and outcome.\n");
        out.push_str("# TYPE nth_agent_actions_total counter\n");
        let actions = self
            .actions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((kind, outcome), n) in actions.iter() {
            let _ = writeln!(
                out,
                "nth_agent_actions_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        drop(actions);
        out.push_str("# HELP nth_agent_errors_total Failed IMDS polls and Kubernetes steps.\n");
        out.push_str("# TYPE nth_agent_errors_total counter\n");
        for (source, counter) in [
            ("imds", &self.imds_errors),
            ("kubernetes", &self.kubernetes_errors),
        ] {
            let _ = writeln!(
                out,
                "nth_agent_errors_total{{source=\"{source}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP nth_agent_last_successful_poll_timestamp_seconds When IMDS last answered a whole poll.\n");
        out.push_str("# TYPE nth_agent_last_successful_poll_timestamp_seconds gauge\n");
        let _ = writeln!(
            out,
            "nth_agent_last_successful_poll_timestamp_seconds {}",
            self.last_poll.load(Ordering::Relaxed)
        );
        out
    }
}

/// Serves `/healthz` and `/metrics` until the process ends. The listener is bound by the
/// caller, so a port in use fails the start rather than a background task.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "accepting a metrics connection failed");
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
            });
            // A scraper that hangs up early is not worth a log line.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_label() {
        let m = Metrics::default();
        m.action("spot-interruption", "drained");
        m.action("spot-interruption", "drained");
        m.error(ErrorSource::Imds);
        let text = m.render();
        assert!(text
            .contains("nth_agent_actions_total{kind=\"spot-interruption\",outcome=\"drained\"} 2"));
        assert!(text.contains("nth_agent_errors_total{source=\"imds\"} 1"));
        assert!(text.contains("nth_agent_errors_total{source=\"kubernetes\"} 0"));
        assert!(text.contains("nth_agent_last_successful_poll_timestamp_seconds 0"));
    }
}
