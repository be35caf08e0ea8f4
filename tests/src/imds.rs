//! An EC2 instance metadata service (IMDS) emulator on loopback, for the agent's tests:
//! IMDSv2 sessions (PUT /latest/api/token with a TTL, 401 for a missing, unknown or expired
//! token when tokens are required), the notice paths the agent polls, which tests set and
//! clear, injected faults (500s, hangs), and a record of every request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// IMDS grants tokens for 1 second to 6 hours.
const MAX_TTL_SECONDS: u64 = 21_600;
/// How long a hanging IMDS holds a request: longer than any sane client timeout.
const HANG: Duration = Duration::from_secs(30);

/// How the emulator misbehaves, for outage tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Every request answered 500.
    ServerError,
    /// Every request held unanswered (the client's timeout fires).
    Hang,
}

/// One request the emulator received.
#[derive(Debug, Clone)]
pub struct ImdsRequest {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub token: Option<String>,
    pub status: u16,
}

#[derive(Debug)]
struct Metadata {
    instance_id: String,
    zone: String,
    require_token: bool,
    /// Issued tokens and when each expires.
    tokens: HashMap<String, Instant>,
    issued: u64,
    spot: Option<Value>,
    rebalance: Option<Value>,
    scheduled: Value,
    target_lifecycle_state: Option<String>,
    fault: Fault,
    /// A fault of the token endpoint alone, as when the hop limit drops the PUT's reply.
    token_fault: Fault,
    requests: Vec<ImdsRequest>,
}

type Shared = Arc<Mutex<Metadata>>;

fn lock(m: &Mutex<Metadata>) -> MutexGuard<'_, Metadata> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running emulator; stops when dropped.
#[derive(Debug)]
pub struct ImdsEmulator {
    /// `http://127.0.0.1:<port>`, for the agent's IMDS_ENDPOINT.
    pub url: String,
    state: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for ImdsEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl ImdsEmulator {
    /// An instance with no notices that requires IMDSv2 tokens.
    pub async fn start(instance_id: &str, zone: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the IMDS emulator")?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(Metadata {
            instance_id: instance_id.to_owned(),
            zone: zone.to_owned(),
            require_token: true,
            tokens: HashMap::new(),
            issued: 0,
            spot: None,
            rebalance: None,
            scheduled: Value::Array(Vec::new()),
            target_lifecycle_state: None,
            fault: Fault::None,
            token_fault: Fault::None,
            requests: Vec::new(),
        }));
        let router = Router::new().fallback(serve).with_state(Arc::clone(&state));
        let server = tokio::spawn(async move {
            crate::serve_http(listener, router).await;
        });
        Ok(Self { url, state, server })
    }

    /// Whether metadata requests need a token (IMDSv2 required) or may go without (optional).
    pub fn require_token(&self, required: bool) {
        lock(&self.state).require_token = required;
    }

    /// The Spot `instance-action` (`{"action", "time"}`), or none (404).
    pub fn set_spot(&self, notice: Option<Value>) {
        lock(&self.state).spot = notice;
    }

    /// The rebalance recommendation (`{"noticeTime"}`), or none (404).
    pub fn set_rebalance(&self, notice: Option<Value>) {
        lock(&self.state).rebalance = notice;
    }

    /// The maintenance events, a JSON array as IMDS serves it.
    pub fn set_scheduled(&self, events: Value) {
        lock(&self.state).scheduled = events;
    }

    /// The Auto Scaling target lifecycle state (`InService`, `Terminated`), or none (404: not
    /// in a group).
    pub fn set_target_lifecycle_state(&self, state: Option<&str>) {
        lock(&self.state).target_lifecycle_state = state.map(str::to_owned);
    }

    pub fn set_fault(&self, fault: Fault) {
        lock(&self.state).fault = fault;
    }

    /// Makes only `PUT /latest/api/token` misbehave: IMDSv2 unusable, IMDSv1 still there.
    pub fn set_token_fault(&self, fault: Fault) {
        lock(&self.state).token_fault = fault;
    }

    /// Forgets every token issued, as if each had expired: the next request with one is 401.
    pub fn expire_tokens(&self) {
        lock(&self.state).tokens.clear();
    }

    /// How many tokens were issued.
    pub fn tokens_issued(&self) -> u64 {
        lock(&self.state).issued
    }

    pub fn requests(&self) -> Vec<ImdsRequest> {
        lock(&self.state).requests.clone()
    }
}

async fn serve(State(state): State<Shared>, request: Request) -> Response {
    let (method, path, token, ttl) = parts(&request);
    // The body is not Sync: it must not be held across a hang.
    drop(request);
    let fault = {
        let md = lock(&state);
        if path == TOKEN_PATH && md.token_fault != Fault::None {
            md.token_fault
        } else {
            md.fault
        }
    };
    let (status, body) = match fault {
        Fault::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
        Fault::Hang => {
            tokio::time::sleep(HANG).await;
            (StatusCode::INTERNAL_SERVER_ERROR, String::new())
        }
        Fault::None => {
            let mut md = lock(&state);
            answer(&mut md, &method, &path, token.as_deref(), ttl)
        }
    };
    lock(&state).requests.push(ImdsRequest {
        at: Instant::now(),
        method: method.to_string(),
        path,
        token,
        status: status.as_u16(),
    });
    (status, body).into_response()
}

fn parts(request: &Request) -> (Method, String, Option<String>, Option<String>) {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    (
        request.method().clone(),
        request.uri().path().to_owned(),
        header(TOKEN_HEADER),
        header(TTL_HEADER),
    )
}

fn answer(
    md: &mut Metadata,
    method: &Method,
    path: &str,
    token: Option<&str>,
    ttl: Option<String>,
) -> (StatusCode, String) {
    if path == TOKEN_PATH {
        if method != Method::PUT {
            return (StatusCode::METHOD_NOT_ALLOWED, String::new());
        }
        let Some(seconds) = ttl
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|s| (1..=MAX_TTL_SECONDS).contains(s))
        else {
            return (StatusCode::BAD_REQUEST, String::new());
        };
        md.issued += 1;
        let value = format!("imds-token-{:04}-AQAEAEXAMPLE", md.issued);
        md.tokens
            .insert(value.clone(), Instant::now() + Duration::from_secs(seconds));
        return (StatusCode::OK, value);
    }
    if method != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, String::new());
    }
    let valid = token.is_some_and(|t| md.tokens.get(t).is_some_and(|exp| Instant::now() < *exp));
    // A token that was sent must be good even where tokens are optional, as IMDS does.
    if (md.require_token || token.is_some()) && !valid {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    let found = match path {
        "/latest/meta-data/instance-id" => Some(md.instance_id.clone()),
        "/latest/meta-data/placement/availability-zone" => Some(md.zone.clone()),
        "/latest/meta-data/spot/instance-action" => md.spot.as_ref().map(Value::to_string),
        "/latest/meta-data/events/recommendations/rebalance" => {
            md.rebalance.as_ref().map(Value::to_string)
        }
        "/latest/meta-data/events/maintenance/scheduled" => Some(md.scheduled.to_string()),
        "/latest/meta-data/autoscaling/target-lifecycle-state" => md.target_lifecycle_state.clone(),
        _ => None,
    };
    match found {
        Some(body) => (StatusCode::OK, body),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}
