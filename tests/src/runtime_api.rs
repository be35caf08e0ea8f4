//! A Lambda Runtime API emulator (the 2018-06-01 interface the Lambda service offers a custom
//! runtime), to drive the real `nth-lambda` binary as a child process: it long-polls `next`,
//! and posts a response or an error per invocation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// How an invocation ended, as the Lambda service would record it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Response(Value),
    /// The runtime posted to `/error`: errorType and errorMessage.
    Error {
        error_type: String,
        message: String,
    },
}

impl Outcome {
    /// The first interruption's outcome (`drained`, ...), or `errorType: errorMessage`.
    pub fn summary(&self) -> String {
        match self {
            Self::Response(v) => v["results"][0]["outcome"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            Self::Error {
                error_type,
                message,
            } => format!("{error_type}: {message}"),
        }
    }
}

struct Pending {
    id: String,
    payload: Value,
    deadline: SystemTime,
}

#[derive(Default)]
struct Inflight {
    replies: HashMap<String, oneshot::Sender<Outcome>>,
    first_next: Option<Instant>,
    init_error: Option<String>,
}

#[derive(Clone)]
struct AppState {
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Pending>>>,
    inflight: Arc<Mutex<Inflight>>,
}

#[derive(Debug)]
pub struct RuntimeApi {
    /// `host:port`, the value of AWS_LAMBDA_RUNTIME_API.
    pub address: String,
    queue: Arc<Queue>,
    server: tokio::task::JoinHandle<()>,
}

/// The invocations waiting for the runtime, as the Lambda service queues them.
#[derive(Debug)]
pub struct Queue {
    sender: mpsc::UnboundedSender<Pending>,
    inflight: Arc<Mutex<Inflight>>,
    counter: Mutex<u64>,
    /// The function's configured timeout, for asynchronous invocations.
    timeout: Mutex<Duration>,
    /// Asynchronous invocations and how each ended, in the order they were made.
    async_outcomes: Mutex<Vec<(Value, Option<Outcome>)>>,
}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("pending", &self.replies.len())
            .finish()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RuntimeApi {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the Runtime API emulator")?;
        let address = listener.local_addr()?.to_string();
        let (sender, receiver) = mpsc::unbounded_channel();
        let state = AppState {
            queue: Arc::new(tokio::sync::Mutex::new(receiver)),
            inflight: Arc::new(Mutex::new(Inflight::default())),
        };
        let inflight = Arc::clone(&state.inflight);
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(state);
        let server = tokio::spawn(async move {
            crate::serve_http(listener, app).await;
        });
        Ok(Self {
            address,
            queue: Arc::new(Queue {
                sender,
                inflight,
                counter: Mutex::new(0),
                timeout: Mutex::new(Duration::from_secs(300)),
                async_outcomes: Mutex::default(),
            }),
            server,
        })
    }

    /// Hands `payload` to the runtime and waits for its answer, giving the function
    /// `timeout` as its configured timeout (the Lambda-Runtime-Deadline-Ms it sees).
    pub async fn invoke(&self, payload: Value, timeout: Duration) -> anyhow::Result<Outcome> {
        self.queue.invoke(payload, timeout).await
    }

    /// Where asynchronous invocations (the Lambda Invoke API's `Event` type) are queued.
    pub fn queue(&self) -> Arc<Queue> {
        Arc::clone(&self.queue)
    }

    /// When the runtime first asked for an invocation.
    pub fn first_next(&self) -> Option<Instant> {
        lock(&self.queue.inflight).first_next
    }

    pub fn init_error(&self) -> Option<String> {
        lock(&self.queue.inflight).init_error.clone()
    }
}

impl Queue {
    /// Sets the function timeout that asynchronous invocations run with.
    pub fn set_timeout(&self, timeout: Duration) {
        *lock(&self.timeout) = timeout;
    }

    /// Queues `payload` as Lambda queues an asynchronous invocation: the caller does not wait,
    /// and the outcome is kept for [`Queue::async_outcomes`].
    pub fn invoke_async(self: &Arc<Self>, payload: Value) {
        let index = {
            let mut outcomes = lock(&self.async_outcomes);
            outcomes.push((payload.clone(), None));
            outcomes.len() - 1
        };
        let queue = Arc::clone(self);
        let timeout = *lock(&self.timeout);
        tokio::spawn(async move {
            let outcome = queue
                .invoke(payload, timeout)
                .await
                .unwrap_or_else(|e| Outcome::Error {
                    error_type: "Runtime.Unanswered".to_owned(),
                    message: e.to_string(),
                });
            lock(&queue.async_outcomes)[index].1 = Some(outcome);
        });
    }

    /// Every asynchronous invocation so far with its outcome (`None` while it runs).
    pub fn async_outcomes(&self) -> Vec<(Value, Option<Outcome>)> {
        lock(&self.async_outcomes).clone()
    }

    async fn invoke(&self, payload: Value, timeout: Duration) -> anyhow::Result<Outcome> {
        let id = {
            let mut counter = lock(&self.counter);
            *counter += 1;
            format!("00000000-0000-4000-a000-{:012}", *counter)
        };
        let (reply, answer) = oneshot::channel();
        lock(&self.inflight).replies.insert(id.clone(), reply);
        self.sender
            .send(Pending {
                id: id.clone(),
                payload,
                deadline: SystemTime::now() + timeout,
            })
            .context("runtime API emulator stopped")?;
        // A little past the function's timeout: the runtime may still report a late result.
        tokio::time::timeout(timeout + Duration::from_secs(5), answer)
            .await
            .with_context(|| format!("invocation {id} got no answer within the function timeout"))?
            .context("runtime API emulator dropped the invocation")
    }
}

async fn next(State(state): State<AppState>) -> Response {
    lock(&state.inflight)
        .first_next
        .get_or_insert_with(Instant::now);
    let Some(pending) = state.queue.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let deadline_ms = pending
        .deadline
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set("lambda-runtime-aws-request-id", pending.id);
    set("lambda-runtime-deadline-ms", deadline_ms.to_string());
    set(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:123456789012:function:nth".to_owned(),
    );
    set(
        "lambda-runtime-trace-id",
        "Root=1-00000000-000000000000000000000000;Sampled=0".to_owned(),
    );
    set("content-type", "application/json".to_owned());
    (StatusCode::OK, headers, pending.payload.to_string()).into_response()
}

fn reply(state: &AppState, id: &str, outcome: Outcome) -> StatusCode {
    match lock(&state.inflight).replies.remove(id) {
        Some(sender) => {
            let _receiver_gone = sender.send(outcome);
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

async fn response(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> StatusCode {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    reply(&state, &id, Outcome::Response(value))
}

async fn error(State(state): State<AppState>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    let value: Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |k: &str| {
        value
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    reply(
        &state,
        &id,
        Outcome::Error {
            error_type: text("errorType"),
            message: text("errorMessage"),
        },
    )
}

async fn init_error(State(state): State<AppState>, body: Bytes) -> StatusCode {
    lock(&state.inflight).init_error = Some(String::from_utf8_lossy(&body).into_owned());
    StatusCode::ACCEPTED
}
