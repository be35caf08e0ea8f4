//! An IMDSv2 client: a session token from `PUT /latest/api/token`, kept until shortly before
//! it expires and fetched again on a 401; IMDSv1 (no token) only when the operator allows it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;
use tracing::{debug, warn};

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// IMDS is on the instance's own hypervisor and answers in about a millisecond; a second
/// without an answer means it is not answering (or the hop limit drops our packets).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Tries per request, and the pause before the second (doubled before each next). A blip
/// is retried within the same poll; a longer outage is left to the poll loop's backoff.
const ATTEMPTS: u32 = 3;
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A token is replaced once less than this share of its life is left, so no request races
/// its expiry (1/5: for the default 6-hour token, 72 minutes early).
const REFRESH_DIVISOR: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS {path}: {message}")]
    Transport { path: String, message: String },
    #[error("IMDS {path}: HTTP {status}")]
    Status { path: String, status: u16 },
    #[error("IMDS {path}: timed out after {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("IMDS {path}: body is not UTF-8")]
    Utf8 { path: String },
}

/// While falling back to IMDSv1, how long before IMDSv2 is tried again: each failed token
/// request may cost a full timeout, which must not be paid on every poll.
const V1_RECHECK: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Token {
    /// `None` while IMDSv1 is in use.
    value: Option<String>,
    refresh_at: Instant,
}

#[derive(Debug)]
pub struct Imds {
    http: Client<HttpConnector, Full<Bytes>>,
    endpoint: String,
    ttl_seconds: u64,
    v1_fallback: bool,
    token: Mutex<Option<Token>>,
}

impl Imds {
    pub fn new(endpoint: &str, ttl_seconds: u64, v1_fallback: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
            endpoint: endpoint.to_owned(),
            ttl_seconds,
            v1_fallback,
            token: Mutex::new(None),
        }
    }

    /// GETs a metadata path (`/latest/meta-data/...`); `None` when IMDS answers 404, which is
    /// how it says "no such notice".
    pub async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let mut pause = FIRST_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            match self.get_once(path).await {
                Ok(found) => return Ok(found),
                Err(error) if attempt < ATTEMPTS => {
                    debug!(%error, attempt, "IMDS request failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn get_once(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let token = self.token().await?;
        let (status, body) = self.send(Method::GET, path, token.as_deref()).await?;
        if status == StatusCode::UNAUTHORIZED {
            // The token expired early, IMDS restarted, or IMDSv2 became required while we
            // were on IMDSv1: one fresh token, one more try.
            self.token.lock().await.take();
            let token = self.token().await?;
            let (status, body) = self.send(Method::GET, path, token.as_deref()).await?;
            return answer(path, status, body);
        }
        answer(path, status, body)
    }

    /// The current token, fetched when missing or near expiry; `None` in IMDSv1 fallback.
    async fn token(&self) -> Result<Option<String>, ImdsError> {
        let mut slot = self.token.lock().await;
        if let Some(token) = slot.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok(token.value.clone());
        }
        let fetched = self
            .send(Method::PUT, TOKEN_PATH, None)
            .await
            .and_then(|(status, body)| match status {
                StatusCode::OK => Ok(body),
                other => Err(ImdsError::Status {
                    path: TOKEN_PATH.into(),
                    status: other.as_u16(),
                }),
            });
        match fetched {
            Ok(value) => {
                let life = Duration::from_secs(self.ttl_seconds);
                let value = value.trim().to_owned();
                *slot = Some(Token {
                    value: Some(value.clone()),
                    refresh_at: Instant::now() + life - life / REFRESH_DIVISOR,
                });
                Ok(Some(value))
            }
            Err(error) if self.v1_fallback => {
                warn!(%error, "no IMDSv2 token; falling back to IMDSv1 as configured");
                *slot = Some(Token {
                    value: None,
                    refresh_at: Instant::now() + V1_RECHECK,
                });
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<(StatusCode, String), ImdsError> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.endpoint));
        if method == Method::PUT {
            request = request.header(TOKEN_TTL_HEADER, self.ttl_seconds);
        }
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        let transport = |message: String| ImdsError::Transport {
            path: path.to_owned(),
            message,
        };
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| transport(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            Ok::<_, ImdsError>((status, body))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ImdsError::Timeout {
                path: path.to_owned(),
                timeout: REQUEST_TIMEOUT,
            })??;
        let body = String::from_utf8(body.to_vec()).map_err(|_| ImdsError::Utf8 {
            path: path.to_owned(),
        })?;
        Ok((status, body))
    }
}

fn answer(path: &str, status: StatusCode, body: String) -> Result<Option<String>, ImdsError> {
    match status {
        StatusCode::OK => Ok(Some(body)),
        StatusCode::NOT_FOUND => Ok(None),
        other => Err(ImdsError::Status {
            path: path.to_owned(),
            status: other.as_u16(),
        }),
    }
}
