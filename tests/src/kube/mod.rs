//! A Kubernetes API server emulator: the real JSON of nodes, pods, evictions and
//! PodDisruptionBudgets over HTTPS, with EKS token checking. Its rules were checked against
//! kube-apiserver v1.28.4; tests/EMULATOR_DIFFERENCES.md lists what was fixed to match and
//! what differs on purpose. Where the real server's behaviour is uncertain, the emulator is
//! the stricter of the two.

pub mod auth;
pub mod patch;
pub mod state;
pub mod status;
pub mod validate;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub use auth::AuthConfig;
pub use state::Timer;
use state::WatchChange;
pub use state::{Behaviour, Key, Kind, Part, World};
use status::ApiError;

use crate::tls::{serve_https, TestPki};

/// One request the emulator served.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub at: Instant,
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub status: u16,
}

/// A failure to inject: the next `times` requests whose method and path match get `status`.
#[derive(Debug, Clone)]
struct Fault {
    method: String,
    path_contains: String,
    kind: FaultKind,
    times: usize,
}

/// What an injected fault does to a request.
#[derive(Debug, Clone, Copy)]
enum FaultKind {
    /// Answer with this status (500, 503, 429 ...).
    Status(u16),
    /// Answer only after this long, as a hung server does.
    Delay(Duration),
    /// Send the headers, then cut the answer off, as a dropped connection does.
    Reset,
}

#[derive(Debug, Default)]
struct Seen {
    faults: Vec<Fault>,
    requests: Vec<RequestRecord>,
    tokens: Vec<String>,
    auth_failures: Vec<String>,
}

#[derive(Clone)]
struct AppState {
    world: Arc<Mutex<World>>,
    seen: Arc<Mutex<Seen>>,
    auth: Arc<AuthConfig>,
    evictions_in_flight: Arc<AtomicUsize>,
    max_evictions_in_flight: Arc<AtomicUsize>,
    token_lifetime_secs: Arc<AtomicI64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has failed already; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running emulator; stops when dropped.
#[derive(Debug)]
pub struct KubeApi {
    pub url: String,
    pub ca_pem: String,
    world: Arc<Mutex<World>>,
    seen: Arc<Mutex<Seen>>,
    max_evictions_in_flight: Arc<AtomicUsize>,
    token_lifetime_secs: Arc<AtomicI64>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl KubeApi {
    pub async fn start(auth: AuthConfig, behaviour: Behaviour) -> anyhow::Result<Self> {
        let pki = TestPki::generate()?;
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the Kubernetes API emulator")?;
        let port = listener.local_addr()?.port();
        let state = AppState {
            world: Arc::new(Mutex::new(World::new(behaviour))),
            seen: Arc::new(Mutex::new(Seen::default())),
            auth: Arc::new(auth),
            evictions_in_flight: Arc::new(AtomicUsize::new(0)),
            max_evictions_in_flight: Arc::new(AtomicUsize::new(0)),
            token_lifetime_secs: Arc::new(AtomicI64::new(auth::TOKEN_LIFETIME_SECS)),
        };
        let router = router(state.clone());
        let server = serve_https(listener, router, &pki)?;
        Ok(Self {
            url: format!("https://127.0.0.1:{port}"),
            ca_pem: pki.ca_pem,
            world: state.world,
            seen: state.seen,
            max_evictions_in_flight: state.max_evictions_in_flight,
            token_lifetime_secs: state.token_lifetime_secs,
            server,
        })
    }

    /// Deletes a namespace: evictions there are refused from now on, and the namespace
    /// controller deletes its pods after `lag`.
    pub fn terminate_namespace(&self, namespace: &str, lag: Duration) {
        lock(&self.world)
            .terminating_namespaces
            .insert(namespace.to_owned());
        let world = Arc::clone(&self.world);
        let namespace = namespace.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(lag).await;
            let timers = lock(&world).delete_namespace_pods(&namespace);
            start_timers(&world, timers);
        });
    }

    /// Starts timers a test got from changing the world directly (e.g. deleting a pod).
    pub fn start_timers(&self, timers: Vec<Timer>) {
        start_timers(&self.world, timers);
    }

    /// Fails the next `times` requests with `method` whose path contains `path_contains`,
    /// with `status` (500, 503, 429 ...), as an overloaded or restarting API server does.
    pub fn inject_failures(&self, method: &str, path_contains: &str, status: u16, times: usize) {
        self.inject(method, path_contains, FaultKind::Status(status), times);
    }

    /// Holds the next `times` matching requests for `delay` before answering them.
    pub fn inject_delay(&self, method: &str, path_contains: &str, delay: Duration, times: usize) {
        self.inject(method, path_contains, FaultKind::Delay(delay), times);
    }

    /// Cuts the next `times` matching answers off after their headers: the client sees the
    /// stream (HTTP/2) or the connection (HTTP/1.1) reset.
    pub fn inject_reset(&self, method: &str, path_contains: &str, times: usize) {
        self.inject(method, path_contains, FaultKind::Reset, times);
    }

    fn inject(&self, method: &str, path_contains: &str, kind: FaultKind, times: usize) {
        lock(&self.seen).faults.push(Fault {
            method: method.to_owned(),
            path_contains: path_contains.to_owned(),
            kind,
            times,
        });
    }

    /// Refuses tokens older than `secs` from now on, as a server whose clock runs ahead would.
    pub fn set_token_lifetime(&self, secs: i64) {
        self.token_lifetime_secs.store(secs, Ordering::SeqCst);
    }

    /// The most evictions the server was handling at once.
    pub fn max_evictions_in_flight(&self) -> usize {
        self.max_evictions_in_flight.load(Ordering::SeqCst)
    }

    /// Reads or changes the cluster directly, as a test's set-up or assertions do.
    pub fn world<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        f(&mut lock(&self.world))
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        lock(&self.world).nodes.get(name).cloned()
    }

    /// Changes a node as another client would: a strategic-merge patch, through the same
    /// write path (validation, resourceVersion) as a PATCH request.
    pub fn patch_node(&self, name: &str, patch: &Value) -> anyhow::Result<()> {
        lock(&self.world)
            .write(Kind::Node, &node_key(name.to_owned()), Part::Main, |n| {
                patch::strategic(n, patch)
            })
            .map(drop)
            .map_err(|e| anyhow::anyhow!("patching node {name}: {e:?}"))
    }

    pub fn pods_on(&self, node: &str) -> Vec<Value> {
        lock(&self.world)
            .pods
            .values()
            .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
            .cloned()
            .collect()
    }

    /// Every request that was not a read (GET): what a dry run must never send.
    pub fn writes(&self) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect()
    }

    /// The reasons of the events about `node`, oldest first, as `kubectl describe node`
    /// lists them.
    pub fn event_reasons(&self, node: &str) -> Vec<String> {
        self.world(|w| {
            w.events
                .iter()
                .filter(|e| e["involvedObject"]["name"] == node)
                .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                .collect()
        })
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.seen).requests.clone()
    }

    pub fn tokens_seen(&self) -> Vec<String> {
        lock(&self.seen).tokens.clone()
    }

    pub fn auth_failures(&self) -> Vec<String> {
        lock(&self.seen).auth_failures.clone()
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api/v1/nodes", get(list_nodes))
        .route(
            "/api/v1/nodes/{name}",
            get(get_node).patch(patch_node).put(put_node),
        )
        .route(
            "/api/v1/nodes/{name}/status",
            get(get_node).patch(patch_node_status).put(put_node_status),
        )
        .route("/api/v1/pods", get(list_all_pods))
        .route("/api/v1/namespaces/{ns}/pods", get(list_ns_pods))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            get(get_pod)
                .patch(patch_pod)
                .put(put_pod)
                .delete(delete_pod),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/status",
            get(get_pod).patch(patch_pod_status).put(put_pod_status),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/eviction",
            post(evict_pod),
        )
        .route("/api/v1/events", get(list_all_events))
        .route(
            "/api/v1/namespaces/{ns}/events",
            get(list_ns_events).post(create_event),
        )
        .route("/apis/policy/v1/poddisruptionbudgets", get(list_all_pdbs))
        .route(
            "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
            get(list_ns_pdbs),
        )
        .fallback(|| async { ApiError::unknown_path() })
        .method_not_allowed_fallback(|| async { ApiError::new_method_not_allowed() })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            authenticate_and_record,
        ))
        .with_state(state)
}

async fn authenticate_and_record(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let at = Instant::now();
    let method = request.method().to_string();
    // Path and query only: over HTTP/2 the request URI also carries the authority.
    let uri = request
        .uri()
        .path_and_query()
        .map(ToString::to_string)
        .unwrap_or_default();
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let lifetime = state.token_lifetime_secs.load(Ordering::SeqCst);
    let verdict = auth::verify(header.as_deref(), &state.auth, lifetime);
    let injected = {
        let mut seen = lock(&state.seen);
        let path = request.uri().path().to_owned();
        seen.faults
            .iter_mut()
            .find(|f| f.times > 0 && f.method == method && path.contains(&f.path_contains))
            .map(|f| {
                f.times -= 1;
                f.kind
            })
    };
    if let Some(FaultKind::Delay(delay)) = injected {
        tokio::time::sleep(delay).await;
    }
    let response = match (verdict, injected) {
        (_, Some(FaultKind::Status(status))) => ApiError::injected(status).into_response(),
        (_, Some(FaultKind::Reset)) => {
            let cut = futures::stream::once(async {
                Err::<axum::body::Bytes, _>(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))
            });
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                axum::body::Body::from_stream(cut),
            )
                .into_response()
        }
        (verdict, _) => match verdict {
            Ok(()) => {
                if let Some(token) = header.as_deref().and_then(|h| h.strip_prefix("Bearer ")) {
                    let mut seen = lock(&state.seen);
                    if !seen.tokens.iter().any(|t| t == token) {
                        seen.tokens.push(token.to_owned());
                    }
                }
                next.run(request).await
            }
            Err(why) => {
                lock(&state.seen).auth_failures.push(why);
                ApiError::unauthorized().into_response()
            }
        },
    };
    lock(&state.seen).requests.push(RequestRecord {
        at,
        method,
        uri,
        status: response.status().as_u16(),
    });
    response
}

async fn version() -> Json<Value> {
    Json(json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-nth-emulator"}))
}

// ---- selectors and lists ----

/// One `field=value`, `field==value` or `field!=value` term of a field selector.
#[derive(Debug, Clone)]
struct FieldTerm {
    field: String,
    value: String,
    equal: bool,
}

fn parse_field_selector(
    selector: Option<&String>,
    supported: &[&str],
) -> Result<Vec<FieldTerm>, ApiError> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    selector
        .split(',')
        .map(|term| {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector term {term:?}"
                )));
            };
            if !supported.contains(&field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            Ok(FieldTerm {
                field: field.to_owned(),
                value: value.to_owned(),
                equal,
            })
        })
        .collect()
}

fn field_value(obj: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(other) => other.to_string(),
        None if field == "spec.unschedulable" => "false".to_owned(),
        None => String::new(),
    }
}

fn label_selector_matches(selector: Option<&String>, obj: &Value) -> Result<bool, ApiError> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Ok(true);
    };
    let labels = obj.pointer("/metadata/labels");
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    for term in selector.split(',') {
        let ok = if let Some((k, v)) = term.split_once("!=") {
            label(k) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            label(k.trim_end_matches('=')) == Some(v)
        } else if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else if term.contains(' ') || term.contains('(') {
            return Err(ApiError::bad_request(format!(
                "emulator supports only equality label selectors, got {term:?}"
            )));
        } else {
            label(term).is_some()
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where a list's items sort, as the API server keys them in storage: `namespace/name`, or
/// the name for cluster-scoped objects.
fn storage_key(item: &Value) -> String {
    let name = item
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match item.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// A page of a list, as the API server pages: items in storage-key order, `limit` of them,
/// and an opaque `continue` token that names the last key served and the first page's
/// resourceVersion (every page reports that one, as the real server's snapshot does; the
/// emulator's later pages are live, so a watch from it may replay a change, never miss one).
/// `remainingItemCount` is given only when no selector filtered the list, as on the real
/// server.
fn list_response(
    kind: &str,
    api_version: &str,
    mut items: Vec<Value>,
    resource_version: String,
    params: &HashMap<String, String>,
) -> Result<Json<Value>, ApiError> {
    use base64::Engine;
    let codec = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (resource_version, after) = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let invalid = |why: String| {
                ApiError::bad_request(format!(
                    "invalid continue token: continue key is not valid: {why}"
                ))
            };
            let decoded = codec.decode(token).map_err(|e| invalid(e.to_string()))?;
            let token: Value =
                serde_json::from_slice(&decoded).map_err(|e| invalid(e.to_string()))?;
            match (token["rv"].as_str(), token["start"].as_str()) {
                (Some(rv), Some(start)) => (rv.to_owned(), Some(start.to_owned())),
                _ => return Err(invalid("missing rv or start".into())),
            }
        }
        None => (resource_version, None),
    };
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    items.sort_by_key(storage_key);
    let items: Vec<Value> = items
        .into_iter()
        .filter(|i| after.as_ref().is_none_or(|a| storage_key(i) > *a))
        .collect();
    let total = items.len();
    let page: Vec<Value> = items
        .into_iter()
        .take(limit)
        .map(|mut item| {
            // The real server leaves kind and apiVersion off list items.
            if let Some(obj) = item.as_object_mut() {
                obj.remove("kind");
                obj.remove("apiVersion");
            }
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version});
    if page.len() < total {
        let last = page.last().map(storage_key).unwrap_or_default();
        let token = json!({"rv": resource_version, "start": last});
        metadata["continue"] = json!(codec.encode(token.to_string()));
        let selected = ["labelSelector", "fieldSelector"]
            .iter()
            .any(|p| params.get(*p).is_some_and(|s| !s.is_empty()));
        if !selected {
            metadata["remainingItemCount"] = json!(total - page.len());
        }
    }
    Ok(Json(
        json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": page}),
    ))
}

/// The emulator serves watches of pods and PodDisruptionBudgets only; a watch of anything
/// else must not quietly get a list back.
fn refuse_watch(q: &HashMap<String, String>, resource: &str) -> Result<(), ApiError> {
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        return Err(ApiError::bad_request(format!(
            "the emulator does not serve watches of {resource}"
        )));
    }
    Ok(())
}

// ---- nodes ----

async fn list_nodes(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    refuse_watch(&q, "nodes")?;
    let fields = parse_field_selector(
        q.get("fieldSelector"),
        &["metadata.name", "spec.unschedulable"],
    )?;
    let world = lock(&s.world);
    let mut items = Vec::new();
    for node in world.nodes.values() {
        if fields
            .iter()
            .all(|t| (field_value(node, &t.field) == t.value) == t.equal)
            && label_selector_matches(q.get("labelSelector"), node)?
        {
            items.push(node.clone());
        }
    }
    list_response(
        "NodeList",
        "v1",
        items,
        world.current_resource_version(),
        &q,
    )
}

async fn get_node(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .nodes
        .get(&name)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found("nodes", &name))
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let why = if e.is_eof() {
            "unexpected end of JSON input".to_owned()
        } else {
            e.to_string()
        };
        ApiError::bad_request(why)
    })
}

/// Applies a PATCH body of the request's patch type to the stored object.
fn apply_patch(object: &mut Value, headers: &HeaderMap, body: &Bytes) -> Result<(), ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let patch = body_json(body)?;
    match content_type.split(';').next().unwrap_or_default().trim() {
        "application/strategic-merge-patch+json" => patch::strategic(object, &patch)?,
        "application/merge-patch+json" => {
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "error decoding patch: json: cannot unmarshal non-object into Go value of type map[string]interface {}",
                ));
            }
            patch::merge(object, &patch);
        }
        "application/json-patch+json" => patch::json_patch(object, &patch)?,
        // Server-side apply (application/apply-patch+yaml) is not emulated; nth does not use it.
        _ => return Err(ApiError::unsupported_media("415: Unsupported Media Type")),
    }
    // A wrong type in the patched object fails decoding on the real server, as a 422 about
    // the patch itself.
    validate::types(object).map_err(|why| {
        ApiError::invalid(format!(
            " \"\" is invalid: patch: Invalid value: {:?}: {why}",
            patch.to_string()
        ))
    })
}

/// Replaces the stored object with a PUT body (kind and apiVersion, when given, must be the
/// object's own).
fn apply_put(object: &mut Value, kind: &str, body: &Bytes) -> Result<(), ApiError> {
    let new = body_json(body)?;
    let (given_kind, given_version) = (new["kind"].as_str(), new["apiVersion"].as_str());
    if given_kind.is_some_and(|k| k != kind) || given_version.is_some_and(|v| v != "v1") {
        return Err(ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {kind}",
            given_kind.unwrap_or(kind),
            given_version.unwrap_or("v1")
        )));
    }
    validate::types(&new).map_err(|why| {
        ApiError::bad_request(format!(
            "{kind} in version \"v1\" cannot be handled as a {kind}: {why}"
        ))
    })?;
    *object = new;
    Ok(())
}

fn node_key(name: String) -> Key {
    (String::new(), name)
}

async fn patch_node(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Node, &node_key(name), Part::Main, |n| {
            apply_patch(n, &headers, &body)
        })
        .map(Json)
}

async fn patch_node_status(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Node, &node_key(name), Part::Status, |n| {
            apply_patch(n, &headers, &body)
        })
        .map(Json)
}

async fn put_node(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Node, &node_key(name), Part::Main, |n| {
            apply_put(n, "Node", &body)
        })
        .map(Json)
}

async fn put_node_status(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Node, &node_key(name), Part::Status, |n| {
            apply_put(n, "Node", &body)
        })
        .map(Json)
}

// ---- pods ----

const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "metadata.name",
    "metadata.namespace",
    "status.phase",
];

fn list_pods(
    s: &AppState,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let fields = parse_field_selector(q.get("fieldSelector"), POD_FIELDS)?;
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        return watch_pods(s, namespace, fields, q);
    }
    let world = lock(&s.world);
    let mut items = Vec::new();
    for pod in world.pods.values() {
        let in_ns = namespace.is_none_or(|ns| {
            pod.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
        });
        if in_ns
            && fields
                .iter()
                .all(|t| (field_value(pod, &t.field) == t.value) == t.equal)
            && label_selector_matches(q.get("labelSelector"), pod)?
        {
            items.push(pod.clone());
        }
    }
    list_response("PodList", "v1", items, world.current_resource_version(), q)
        .map(IntoResponse::into_response)
}

/// The longest watch the server keeps open when the client names no timeoutSeconds.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A watch of pods, filtered by namespace, fields and labels.
fn watch_pods(
    s: &AppState,
    namespace: Option<&str>,
    fields: Vec<FieldTerm>,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let labels = q.get("labelSelector").cloned();
    let namespace = namespace.map(str::to_owned);
    let matches = move |pod: &Value| {
        namespace
            .as_deref()
            .is_none_or(|ns| pod.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns))
            && fields
                .iter()
                .all(|t| (field_value(pod, &t.field) == t.value) == t.equal)
            && label_selector_matches(labels.as_ref(), pod).unwrap_or(false)
    };
    watch(s, "pods", matches, q, |world| {
        world.pods.values().cloned().collect()
    })
}

/// A watch: JSON lines of `{"type", "object"}` for changes to `resource` that `matches`,
/// from the given resourceVersion (or, without one, synthetic ADDED events for what
/// `existing` returns), until timeoutSeconds.
fn watch(
    s: &AppState,
    resource: &'static str,
    matches: impl Fn(&Value) -> bool + Send + 'static,
    q: &HashMap<String, String>,
    existing: impl FnOnce(&World) -> Vec<Value>,
) -> Result<Response, ApiError> {
    let matches =
        move |change: &WatchChange| change.resource == resource && matches(&change.object);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let from = match q.get("resourceVersion").filter(|rv| !rv.is_empty()) {
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
            ApiError::internal(format!(
                "resourceVersion: Invalid value: {rv:?}: strconv.ParseUint: parsing {rv:?}: invalid syntax"
            ))
        })?),
        None => None,
    }
    // "0" means any version, as no version does: the watch starts with what exists.
    .filter(|rv| *rv > 0);
    let world = lock(&s.world);
    let (initial, receiver) = match from {
        Some(rv) => match world.watch_from(rv) {
            Some(found) => found,
            None => {
                // The real server answers 200 and ends the stream with one ERROR event.
                let oldest = world.oldest_watchable();
                let status =
                    ApiError::gone(format!("too old resource version: {rv} ({oldest})")).body();
                let line = format!("{}\n", json!({"type": "ERROR", "object": status}));
                return Ok((
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    line,
                )
                    .into_response());
            }
        },
        None => {
            let current: u64 = world.current_resource_version().parse().unwrap_or(0);
            let (_, receiver) = world
                .watch_from(current)
                .ok_or_else(|| ApiError::gone("no history"))?;
            let existing = existing(&world)
                .into_iter()
                .map(|object| {
                    Arc::new(WatchChange {
                        resource,
                        kind: "ADDED",
                        object,
                    })
                })
                .collect();
            (existing, receiver)
        }
    };
    drop(world);
    let deadline = tokio::time::Instant::now() + timeout;
    let state = (std::collections::VecDeque::from(initial), receiver, matches);
    let stream =
        futures::stream::unfold(state, move |(mut past, mut receiver, matches)| async move {
            loop {
                let change = match past.pop_front() {
                    Some(change) => change,
                    None => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Ok((_, change))) => change,
                        // Timed out, or fell too far behind: end the watch; the client re-lists.
                        _ => return None,
                    },
                };
                if matches(&change) {
                    let line = format!(
                        "{}\n",
                        json!({"type": change.kind, "object": change.object})
                    );
                    return Some((
                        Ok::<_, Infallible>(Bytes::from(line)),
                        (past, receiver, matches),
                    ));
                }
            }
        });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

async fn list_all_pods(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    list_pods(&s, None, &q)
}

async fn list_ns_pods(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    list_pods(&s, Some(&ns), &q)
}

async fn get_pod(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .pods
        .get(&(ns, name.clone()))
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found("pods", &name))
}

async fn patch_pod(
    State(s): State<AppState>,
    Path(key): Path<Key>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Pod, &key, Part::Main, |p| {
            apply_patch(p, &headers, &body)
        })
        .map(Json)
}

async fn patch_pod_status(
    State(s): State<AppState>,
    Path(key): Path<Key>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Pod, &key, Part::Status, |p| {
            apply_patch(p, &headers, &body)
        })
        .map(Json)
}

async fn put_pod(
    State(s): State<AppState>,
    Path(key): Path<Key>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Pod, &key, Part::Main, |p| apply_put(p, "Pod", &body))
        .map(Json)
}

async fn put_pod_status(
    State(s): State<AppState>,
    Path(key): Path<Key>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    lock(&s.world)
        .write(Kind::Pod, &key, Part::Status, |p| {
            apply_put(p, "Pod", &body)
        })
        .map(Json)
}

/// DeleteOptions, strictly decoded: an unknown field is a 400, as with fieldValidation=Strict.
fn delete_options(value: Option<&Value>) -> Result<(Option<i64>, Option<String>), ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok((None, None));
    };
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::bad_request("DeleteOptions must be an object"))?;
    const KNOWN: &[&str] = &[
        "kind",
        "apiVersion",
        "gracePeriodSeconds",
        "preconditions",
        "propagationPolicy",
        "orphanDependents",
        "dryRun",
    ];
    if let Some(unknown) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: unknown field \"deleteOptions.{unknown}\""
        )));
    }
    let grace = match obj.get("gracePeriodSeconds") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::bad_request("gracePeriodSeconds must be an integer"))?,
        ),
    };
    let uid = obj
        .get("preconditions")
        .and_then(|p| p.get("uid"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok((grace, uid))
}

pub(crate) fn start_timers(world: &Arc<Mutex<World>>, timers: Vec<Timer>) {
    for timer in timers {
        let world = Arc::clone(world);
        tokio::spawn(async move {
            match timer {
                Timer::RemovePod { key, uid, after } => {
                    tokio::time::sleep(after).await;
                    lock(&world).remove_pod(&key, &uid);
                }
                Timer::PodReady { key, uid, after } => {
                    tokio::time::sleep(after).await;
                    lock(&world).mark_ready(&key, &uid);
                }
            }
        });
    }
}

async fn delete_pod(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let options: Option<Value> = if body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("body is not JSON: {e}")))?,
        )
    };
    let (mut grace, uid) = delete_options(options.as_ref())?;
    if let Some(g) = q.get("gracePeriodSeconds") {
        grace = Some(
            g.parse()
                .map_err(|_| ApiError::bad_request("gracePeriodSeconds must be an integer"))?,
        );
    }
    let (pod, timers) = lock(&s.world).delete_pod(&(ns, name), grace, uid.as_deref())?;
    start_timers(&s.world, timers);
    Ok(Json(pod))
}

async fn evict_pod(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let eviction: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Eviction body is not JSON: {e}")))?;
    let obj = eviction
        .as_object()
        .ok_or_else(|| ApiError::bad_request("Eviction body must be an object"))?;
    if let Some(unknown) = obj
        .keys()
        .find(|k| !["apiVersion", "kind", "metadata", "deleteOptions"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: unknown field \"{unknown}\""
        )));
    }
    if eviction["kind"] != "Eviction"
        || !matches!(
            eviction["apiVersion"].as_str(),
            Some("policy/v1" | "policy/v1beta1")
        )
    {
        return Err(ApiError::bad_request("body must be a policy/v1 Eviction"));
    }
    if eviction.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
        return Err(ApiError::bad_request(
            "name in URL does not match name in Eviction object",
        ));
    }
    if let Some(body_ns) = eviction
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        if body_ns != ns {
            return Err(ApiError::bad_request(
                "namespace in URL does not match namespace in Eviction object",
            ));
        }
    }
    let (grace, uid) = delete_options(eviction.get("deleteOptions"))?;
    let now = s.evictions_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_evictions_in_flight.fetch_max(now, Ordering::SeqCst);
    let latency = lock(&s.world).behaviour.eviction_latency;
    tokio::time::sleep(latency).await;
    let evicted = lock(&s.world).evict(&(ns, name), grace, uid.as_deref());
    s.evictions_in_flight.fetch_sub(1, Ordering::SeqCst);
    let timers = evicted?;
    start_timers(&s.world, timers);
    Ok((
        StatusCode::CREATED,
        Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})),
    )
        .into_response())
}

// ---- PodDisruptionBudgets ----

fn list_pdbs(
    s: &AppState,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        let wanted = namespace.map(str::to_owned);
        let in_namespace = move |pdb: &Value| {
            wanted.as_deref().is_none_or(|ns| {
                pdb.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
            })
        };
        let listed = namespace.map(str::to_owned);
        return watch(s, "poddisruptionbudgets", in_namespace, q, move |world| {
            world
                .pdbs
                .iter()
                .filter(|((ns, _), _)| listed.as_deref().is_none_or(|want| want == ns))
                .map(|(_, pdb)| world.pdb_with_status(pdb))
                .collect()
        });
    }
    let world = lock(&s.world);
    let items = world
        .pdbs
        .iter()
        .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
        .map(|(_, pdb)| world.pdb_with_status(pdb))
        .collect();
    list_response(
        "PodDisruptionBudgetList",
        "policy/v1",
        items,
        world.current_resource_version(),
        q,
    )
    .map(IntoResponse::into_response)
}

async fn list_all_pdbs(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    list_pdbs(&s, None, &q)
}

async fn list_ns_pdbs(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    list_pdbs(&s, Some(&ns), &q)
}

// ---- events ----

const EVENT_FIELDS: &[&str] = &[
    "involvedObject.name",
    "involvedObject.kind",
    "reason",
    "type",
];

fn list_events(
    s: &AppState,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<Json<Value>, ApiError> {
    refuse_watch(q, "events")?;
    let fields = parse_field_selector(q.get("fieldSelector"), EVENT_FIELDS)?;
    let world = lock(&s.world);
    let items = world
        .events
        .iter()
        .filter(|e| {
            namespace.is_none_or(|ns| {
                e.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
            })
        })
        .filter(|e| {
            fields
                .iter()
                .all(|t| (field_value(e, &t.field) == t.value) == t.equal)
        })
        .cloned()
        .collect();
    list_response(
        "EventList",
        "v1",
        items,
        world.current_resource_version(),
        q,
    )
}

async fn list_all_events(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    list_events(&s, None, &q)
}

async fn list_ns_events(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    list_events(&s, Some(&ns), &q)
}

/// Creates a core/v1 Event, with the validation the API server applies to the fields
/// `kubectl describe` shows.
async fn create_event(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut event: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Event body is not JSON: {e}")))?;
    if event
        .pointer("/involvedObject/kind")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        || event
            .pointer("/involvedObject/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return Err(ApiError::invalid(
            "involvedObject.kind and involvedObject.name: Required value",
        ));
    }
    if event["reason"].as_str().is_none_or(str::is_empty) {
        return Err(ApiError::invalid("reason: Required value"));
    }
    if !matches!(event["type"].as_str(), Some("Normal" | "Warning")) {
        return Err(ApiError::invalid(
            "type: Unsupported value: must be Normal or Warning",
        ));
    }
    if event
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .is_some_and(|n| n != ns)
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let mut world = lock(&s.world);
    let name = match event.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) => name.to_owned(),
        None => {
            let prefix = event
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid("metadata.name or metadata.generateName: Required value")
                })?;
            format!("{prefix}{:x}", world.events.len() + 0x1000)
        }
    };
    // The real server's rule for core/v1 Events: an event about a cluster-scoped object
    // (a Node) lives in "default"; one about a namespaced object, in that object's namespace.
    let involved_ns = event
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let fits = if involved_ns.is_empty() {
        ns == "default"
    } else {
        ns == involved_ns
    };
    if !fits {
        let error = status::FieldError {
            field: "involvedObject.namespace".into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {involved_ns:?}: does not match event.namespace"),
        };
        return Err(ApiError::invalid_object("Event", &name, &[error]));
    }
    event["metadata"]["name"] = json!(name);
    event["metadata"]["namespace"] = json!(ns);
    world.stamp(&mut event);
    world.events.push(event.clone());
    Ok((StatusCode::CREATED, Json(event)))
}

/// A kube client for the emulator through nth's own EKS client stack (TLS against the
/// emulator's CA, a presigned token from the test credentials, no automatic 429 retry).
pub fn client(api: &KubeApi, cluster: &str) -> anyhow::Result<kube::Client> {
    crate::eks_client(&api.url, &api.ca_pem, cluster)
}

/// A kubeconfig for the emulator: its URL and CA, and a presigned EKS token (valid 15
/// minutes) from the test credentials for `cluster`.
pub fn kubeconfig(api: &KubeApi, cluster: &str) -> anyhow::Result<serde_json::Value> {
    crate::eks_kubeconfig(&api.url, &api.ca_pem, cluster)
}
