//! A Lambda Runtime API emulator (the 2018-06-01 interface the Lambda service offers a custom
//! runtime), to drive the real `nth-lambda` binary as a child process: it long-polls `next`,
//! and posts a response or an error per invocation.
//!
//! It holds the function to Lambda's rules: an invocation not answered by its deadline ends
//! in `Sandbox.Timedout` and the execution environment is replaced (the process restarted,
//! whatever it was still doing lost); an asynchronous invocation that fails is delivered
//! again, twice by default, unless the event has grown older than the maximum event age.

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
    /// The function timeout: the deadline runs from when the runtime takes the invocation.
    timeout: Duration,
    /// Told the deadline when the runtime takes the invocation.
    taken: oneshot::Sender<SystemTime>,
}

/// What Lambda records for an invocation its timeout ended.
pub const TIMED_OUT: &str = "Sandbox.Timedout";

/// How Lambda retries a failed asynchronous invocation (the function's event invoke
/// config). Lambda waits about a minute, then two, between attempts; the rig keeps the
/// count and the maximum event age and shortens the waits.
#[derive(Debug, Clone)]
pub struct AsyncRetries {
    /// Lambda's default, and the templates': 2.
    pub max_retries: usize,
    /// Before the first retry; doubled before each next one.
    pub first_delay: Duration,
    /// Past this age an event is not delivered again (Lambda's default: 6 hours).
    pub max_event_age: Duration,
}

impl Default for AsyncRetries {
    fn default() -> Self {
        Self {
            max_retries: 2,
            first_delay: Duration::from_secs(1),
            max_event_age: Duration::from_secs(6 * 3600),
        }
    }
}

/// One asynchronous invocation (the Invoke API's `Event` type), as Lambda handled it.
#[derive(Debug, Clone)]
pub struct AsyncInvocation {
    pub payload: Value,
    /// How each delivery ended, in order.
    pub attempts: Vec<Outcome>,
    /// Every delivery it will get has ended.
    pub finished: bool,
}

impl AsyncInvocation {
    /// The last delivery's outcome, once no other delivery will follow.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.attempts.last().filter(|_| self.finished)
    }
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
pub struct Queue {
    sender: mpsc::UnboundedSender<Pending>,
    inflight: Arc<Mutex<Inflight>>,
    counter: Mutex<u64>,
    /// The function's configured timeout, for asynchronous invocations.
    timeout: Mutex<Duration>,
    retries: Mutex<AsyncRetries>,
    /// Asynchronous invocations and how each ended, in the order they were made.
    async_invocations: Mutex<Vec<AsyncInvocation>>,
    /// Replaces the execution environment after a timeout (restarts the runtime process).
    on_timeout: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("timeout", &*lock(&self.timeout))
            .field("async_invocations", &lock(&self.async_invocations).len())
            .finish_non_exhaustive()
    }
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
                retries: Mutex::default(),
                async_invocations: Mutex::default(),
                on_timeout: Mutex::default(),
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

    /// Sets how failed asynchronous invocations are delivered again.
    pub fn set_retries(&self, retries: AsyncRetries) {
        *lock(&self.retries) = retries;
    }

    /// What replaces the execution environment when an invocation times out.
    pub fn on_timeout(&self, reset: impl Fn() + Send + Sync + 'static) {
        *lock(&self.on_timeout) = Some(Arc::new(reset));
    }

    /// Queues `payload` as Lambda queues an asynchronous invocation: the caller does not wait,
    /// a failed delivery is retried, and every delivery is kept for
    /// [`Queue::async_invocations`].
    pub fn invoke_async(self: &Arc<Self>, payload: Value) {
        let index = {
            let mut invocations = lock(&self.async_invocations);
            invocations.push(AsyncInvocation {
                payload: payload.clone(),
                attempts: Vec::new(),
                finished: false,
            });
            invocations.len() - 1
        };
        let queue = Arc::clone(self);
        let timeout = *lock(&self.timeout);
        let retries = lock(&self.retries).clone();
        let queued = Instant::now();
        tokio::spawn(async move {
            let mut delay = retries.first_delay;
            for attempt in 0..=retries.max_retries {
                let outcome = queue
                    .invoke(payload.clone(), timeout)
                    .await
                    .unwrap_or_else(|e| Outcome::Error {
                        error_type: "Runtime.Unanswered".to_owned(),
                        message: e.to_string(),
                    });
                let failed = matches!(outcome, Outcome::Error { .. });
                let too_old = queued.elapsed() + delay > retries.max_event_age;
                let last = !failed || attempt == retries.max_retries || too_old;
                {
                    let mut invocations = lock(&queue.async_invocations);
                    invocations[index].attempts.push(outcome);
                    invocations[index].finished = last;
                }
                if last {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        });
    }

    /// Every asynchronous invocation so far with its final outcome (`None` while a delivery
    /// runs or another will follow).
    pub fn async_outcomes(&self) -> Vec<(Value, Option<Outcome>)> {
        lock(&self.async_invocations)
            .iter()
            .map(|i| (i.payload.clone(), i.outcome().cloned()))
            .collect()
    }

    /// Every asynchronous invocation so far, with each of its deliveries.
    pub fn async_invocations(&self) -> Vec<AsyncInvocation> {
        lock(&self.async_invocations).clone()
    }

    /// Hands `payload` to the runtime and waits for its answer until the deadline, which
    /// runs from when the runtime takes it. Past the deadline the invocation ends in
    /// [`TIMED_OUT`] and the execution environment is replaced, as Lambda does.
    async fn invoke(&self, payload: Value, timeout: Duration) -> anyhow::Result<Outcome> {
        let id = {
            let mut counter = lock(&self.counter);
            *counter += 1;
            format!("00000000-0000-4000-a000-{:012}", *counter)
        };
        let (reply, answer) = oneshot::channel();
        let (taken, deadline) = oneshot::channel();
        lock(&self.inflight).replies.insert(id.clone(), reply);
        self.sender
            .send(Pending {
                id: id.clone(),
                payload,
                timeout,
                taken,
            })
            .context("runtime API emulator stopped")?;
        let deadline = tokio::time::timeout(QUEUE_PATIENCE, deadline)
            .await
            .with_context(|| format!("invocation {id}: the runtime never asked for it"))?
            .context("runtime API emulator dropped the invocation")?;
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        match tokio::time::timeout(left, answer).await {
            Ok(outcome) => outcome.context("runtime API emulator dropped the invocation"),
            Err(_) => {
                lock(&self.inflight).replies.remove(&id);
                let reset = lock(&self.on_timeout).clone();
                if let Some(reset) = reset {
                    reset();
                }
                Ok(Outcome::Error {
                    error_type: TIMED_OUT.to_owned(),
                    message: format!(
                        "RequestId: {id} Error: Task timed out after {:.2} seconds",
                        timeout.as_secs_f64()
                    ),
                })
            }
        }
    }
}

/// How long an invocation may wait for the runtime to take it: far longer than any test,
/// so that a runtime that died fails the test instead of hanging it.
const QUEUE_PATIENCE: Duration = Duration::from_secs(600);

async fn next(State(state): State<AppState>) -> Response {
    lock(&state.inflight)
        .first_next
        .get_or_insert_with(Instant::now);
    let Some(pending) = state.queue.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let deadline = SystemTime::now() + pending.timeout;
    let _invoker_gone = pending.taken.send(deadline);
    let deadline_ms = deadline
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
        // With the lineage Lambda adds for its recursive loop detection: a call that passes
        // this header on ties the next invocation to this one.
        "Root=1-00000000-000000000000000000000000;Sampled=0;Lineage=a87bd80c:1".to_owned(),
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
