//! The agent's counters and the HTTP server for `/healthz` and `/metrics` (Prometheus text).
//! Two fixed endpoints do not need a web framework: hyper alone keeps the binary small.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

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

/// What one client may cost the agent, whose memory limit is 64 MiB: a scraper and a probe
/// need a connection or two, each done in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A client that has not sent a whole request head by then is disconnected (a slow or
    /// idle connection holds no task for long).
    pub header_read_timeout: Duration,
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// The longest a connection is kept, keep-alive included.
    pub max_connection_age: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 16,
            max_connection_age: Duration::from_secs(60),
        }
    }
}

/// Serves `/healthz` and `/metrics` until the process ends, within [`ServerLimits::default`].
/// The listener is bound by the caller, so a port in use fails the start rather than a
/// background task.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    serve_with(listener, metrics, ServerLimits::default()).await;
}

pub async fn serve_with(listener: TcpListener, metrics: Arc<Metrics>, limits: ServerLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "accepting a metrics connection failed");
                // Out of file descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(
                max = limits.max_connections,
                "metrics connection refused: too many open"
            );
            drop(stream);
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            // A scraper that hangs up early, or is cut off, is not worth a log line.
            let _ = tokio::time::timeout(limits.max_connection_age, connection).await;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(limits: ServerLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve_with(listener, Arc::new(Metrics::default()), limits));
        addr
    }

    /// Reads until the server closes the connection; the bytes read.
    async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        out
    }

    async fn healthz(addr: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        String::from_utf8_lossy(&until_closed(&mut stream).await).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
        let addr = server(ServerLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        })
        .await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let began = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), until_closed(&mut slow))
            .await
            .expect("the server closed the connection");
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "closed after {:?}",
            began.elapsed()
        );
        assert!(
            !String::from_utf8_lossy(&answer).contains("nth_agent"),
            "no metrics for an unfinished request"
        );
        assert!(
            healthz(addr).await.contains("ok"),
            "the server still answers"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        let addr = server(ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 2,
            max_connection_age: Duration::from_secs(30),
        })
        .await;
        // Two idle connections take both slots.
        let held = [
            TcpStream::connect(addr).await.expect("connect"),
            TcpStream::connect(addr).await.expect("connect"),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = TcpStream::connect(addr).await.expect("the kernel accepts");
        let _ = third
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let answer = tokio::time::timeout(Duration::from_secs(2), until_closed(&mut third))
            .await
            .expect("closed at once, not left waiting");
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        // A slot freed is a slot served.
        drop(held);
        let began = std::time::Instant::now();
        loop {
            let answer = healthz(addr).await;
            if answer.contains("200 OK") {
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(3),
                "never served again: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_is_not_kept_past_its_age() {
        let addr = server(ServerLimits {
            max_connection_age: Duration::from_millis(400),
            ..ServerLimits::default()
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // Keep-alive: one request answered, then the connection idles until its age is up.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answer = tokio::time::timeout(Duration::from_secs(5), until_closed(&mut stream))
            .await
            .expect("closed");
        assert!(String::from_utf8_lossy(&answer).contains("ok"));
    }

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
