//! The AWS endpoint the function sees: moto for everything, except the two Auto Scaling
//! lifecycle calls moto does not implement (it answers them with HTTP 500), which are served
//! here with Auto Scaling's semantics: a call must name a pending action of that group, hook
//! and instance (and its token, when given); a completed action is gone; heartbeats extend
//! it; an action not heartbeat within its hook's heartbeat timeout, or older than the hook's
//! global timeout, ends with the hook's default result. DescribeLifecycleHooks answers for
//! the hooks of those actions. eks:DescribeCluster is served here too, because moto's clusters have endpoints of its
//! own making, and the rig's clusters are Kubernetes API emulators. Every call is recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;

use crate::TEST_REGION;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const XMLNS: &str = "http://autoscaling.amazonaws.com/doc/2011-01-01/";

/// One lifecycle action Auto Scaling is waiting on.
#[derive(Debug, Clone)]
pub struct PendingAction {
    pub group: String,
    pub hook: String,
    pub instance_id: String,
    pub token: String,
    pub hook_settings: HookSettings,
    pub started: Instant,
    pub heartbeats: Vec<Instant>,
    /// The result and when it came.
    pub completed: Option<(String, Instant)>,
    /// The action ran out of time and took the hook's default result.
    pub timed_out: bool,
}

/// The lifecycle hook's settings: its transition, and when Auto Scaling stops waiting.
#[derive(Debug, Clone)]
pub struct HookSettings {
    /// The hook fires on a launch (`Pending:Wait`), else on a termination
    /// (`Terminating:Wait`).
    pub launching: bool,
    pub heartbeat_timeout: Duration,
    /// `CONTINUE` or `ABANDON` (Auto Scaling's default).
    pub default_result: String,
}

impl Default for HookSettings {
    /// A termination hook with Auto Scaling's defaults: an hour, then ABANDON.
    fn default() -> Self {
        Self {
            launching: false,
            heartbeat_timeout: Duration::from_secs(3600),
            default_result: "ABANDON".to_owned(),
        }
    }
}

impl HookSettings {
    /// A launch hook with Auto Scaling's defaults.
    pub fn launching() -> Self {
        Self {
            launching: true,
            ..Self::default()
        }
    }
}

/// Auto Scaling's longest wait on one action, whatever the heartbeats.
const MAX_GLOBAL_TIMEOUT: Duration = Duration::from_secs(48 * 3600);

impl HookSettings {
    /// 100 heartbeat timeouts or 48 hours, whichever is smaller.
    pub fn global_timeout(&self) -> Duration {
        (self.heartbeat_timeout * 100).min(MAX_GLOBAL_TIMEOUT)
    }
}

impl PendingAction {
    /// The instance's LifecycleState while Auto Scaling waits on this action, and after.
    fn lifecycle_state(&self) -> &'static str {
        match (self.hook_settings.launching, &self.completed) {
            (false, None) => "Terminating:Wait",
            (false, Some(_)) => "Terminating:Proceed",
            (true, None) => "Pending:Wait",
            (true, Some((result, _))) if result == "CONTINUE" => "InService",
            (true, Some(_)) => "Terminating",
        }
    }

    /// When Auto Scaling stops waiting, as things stand.
    fn expires_at(&self) -> Instant {
        let last = self.heartbeats.last().copied().unwrap_or(self.started);
        (last + self.hook_settings.heartbeat_timeout)
            .min(self.started + self.hook_settings.global_timeout())
    }

    /// Ends the action with the hook's default result once its time is up.
    fn expire(&mut self, now: Instant) {
        let expires = self.expires_at();
        if self.completed.is_none() && now >= expires {
            self.completed = Some((self.hook_settings.default_result.clone(), expires));
            self.timed_out = true;
        }
    }
}

/// One lifecycle call received, answered or not.
#[derive(Debug, Clone)]
pub struct LifecycleCall {
    pub action: String,
    pub instance_id: String,
    pub token: String,
    pub result: Option<String>,
    pub status: u16,
    pub at: Instant,
}

#[derive(Default)]
struct Inner {
    /// Actions to fail: (action, error code, times left).
    faults: Vec<(String, String, usize)>,
    /// Actions to hold before answering: (action, delay, times left).
    delays: Vec<(String, Duration, usize)>,
    pending: Vec<PendingAction>,
    calls: Vec<LifecycleCall>,
    /// Every AWS API action seen, in order, with its arrival (for round-trip counting).
    actions: Vec<(Instant, String)>,
    /// The X-Amzn-Trace-Id header of each Invoke, in order: Lambda's recursive loop
    /// detection follows the lineage it carries from one invocation to the next.
    invoke_traces: Vec<Option<String>>,
    /// EKS clusters by name: (endpoint, base64 CA bundle).
    clusters: HashMap<String, (String, String)>,
    /// Where Lambda asynchronous invocations go.
    invoke: Option<Arc<dyn Fn(serde_json::Value) + Send + Sync>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("pending", &self.pending.len())
            .field("calls", &self.calls.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct AppState {
    inner: Arc<Mutex<Inner>>,
    moto: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
pub struct AwsFront {
    pub endpoint: String,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for AwsFront {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl AwsFront {
    pub async fn start(moto_endpoint: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the AWS front")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let state = AppState {
            inner: Arc::new(Mutex::new(Inner::default())),
            moto: moto_endpoint.to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        let inner = Arc::clone(&state.inner);
        let app = Router::new().fallback(handle).with_state(state);
        let server = tokio::spawn(async move {
            crate::serve_http(listener, app).await;
        });
        Ok(Self {
            endpoint,
            inner,
            server,
        })
    }

    /// Makes Auto Scaling wait on a lifecycle action, as a hook with the default settings
    /// does when it fires.
    pub fn add_pending(&self, group: &str, hook: &str, instance_id: &str, token: &str) {
        self.add_pending_with(group, hook, instance_id, token, HookSettings::default());
    }

    /// As [`AwsFront::add_pending`], for a hook with `settings`.
    pub fn add_pending_with(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
        token: &str,
        settings: HookSettings,
    ) {
        lock(&self.inner).pending.push(PendingAction {
            group: group.to_owned(),
            hook: hook.to_owned(),
            instance_id: instance_id.to_owned(),
            token: token.to_owned(),
            hook_settings: settings,
            started: Instant::now(),
            heartbeats: Vec::new(),
            completed: None,
            timed_out: false,
        });
    }

    /// Makes the action of `instance_id` one that began `ago`, heartbeat just now (by an
    /// earlier invocation): what a long drain's late round finds.
    pub fn backdate(&self, instance_id: &str, ago: Duration) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        for p in inner
            .pending
            .iter_mut()
            .filter(|p| p.instance_id == instance_id)
        {
            p.started = now.checked_sub(ago).unwrap_or(p.started);
            p.heartbeats.push(now);
        }
    }

    /// The lifecycle actions, each as Auto Scaling sees it now (timed out, if its time is up).
    pub fn pending(&self) -> Vec<PendingAction> {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        inner.pending.iter_mut().for_each(|p| p.expire(now));
        inner.pending.clone()
    }

    pub fn calls(&self) -> Vec<LifecycleCall> {
        lock(&self.inner).calls.clone()
    }

    /// Makes eks:DescribeCluster know `name`, served at `endpoint` with the CA `ca_pem`.
    pub fn add_cluster(&self, name: &str, endpoint: &str, ca_pem: &str) {
        let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        lock(&self.inner)
            .clusters
            .insert(name.to_owned(), (endpoint.to_owned(), ca_data));
    }

    /// Makes lambda:InvokeFunction with the `Event` invocation type hand the payload to
    /// `invoke`, as Lambda queues an asynchronous invocation of the function.
    pub fn on_invoke(&self, invoke: impl Fn(serde_json::Value) + Send + Sync + 'static) {
        lock(&self.inner).invoke = Some(Arc::new(invoke));
    }

    /// The X-Amzn-Trace-Id header each Invoke carried (`None`: none), in order.
    pub fn invoke_traces(&self) -> Vec<Option<String>> {
        lock(&self.inner).invoke_traces.clone()
    }

    /// Fails the next `times` calls of `action` with the EC2 error `code` (e.g.
    /// RequestLimitExceeded, EC2's throttling answer).
    pub fn fail(&self, action: &str, code: &str, times: usize) {
        lock(&self.inner)
            .faults
            .push((action.to_owned(), code.to_owned(), times));
    }

    /// Holds the next `times` calls of `action` for `delay` before answering, as an endpoint
    /// that has stopped responding does.
    pub fn delay(&self, action: &str, delay: Duration, times: usize) {
        lock(&self.inner)
            .delays
            .push((action.to_owned(), delay, times));
    }

    /// Every AWS API action the function called, in order.
    pub fn actions(&self) -> Vec<String> {
        lock(&self.inner)
            .actions
            .iter()
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// How many times the function called `action`.
    pub fn count(&self, action: &str) -> usize {
        lock(&self.inner)
            .actions
            .iter()
            .filter(|(_, a)| a == action)
            .count()
    }

    /// The AWS API actions called at or after `since`.
    pub fn actions_since(&self, since: Instant) -> Vec<String> {
        lock(&self.inner)
            .actions
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, a)| a.clone())
            .collect()
    }
}

/// The next use of an injected fault for `action`, if any is left.
fn take<T: Clone>(faults: &mut [(String, T, usize)], action: &str) -> Option<T> {
    faults
        .iter_mut()
        .find(|(a, _, times)| a == action && *times > 0)
        .map(|(_, fault, times)| {
            *times -= 1;
            fault.clone()
        })
}

/// The hooks of the group's lifecycle actions, filtered by `LifecycleHookNames.member.N`.
fn describe_hooks(state: &AppState, field: &impl Fn(&str) -> Option<String>) -> Response {
    let group = field("AutoScalingGroupName").unwrap_or_default();
    let wanted: Vec<String> = (1..)
        .map_while(|i| field(&format!("LifecycleHookNames.member.{i}")))
        .collect();
    let inner = lock(&state.inner);
    let mut seen = Vec::new();
    let mut members = String::new();
    for p in inner.pending.iter().filter(|p| p.group == group) {
        if seen.contains(&p.hook) || !(wanted.is_empty() || wanted.contains(&p.hook)) {
            continue;
        }
        seen.push(p.hook.clone());
        members.push_str(&format!(
            "<member><LifecycleHookName>{}</LifecycleHookName><AutoScalingGroupName>{group}</AutoScalingGroupName><HeartbeatTimeout>{}</HeartbeatTimeout><GlobalTimeout>{}</GlobalTimeout><DefaultResult>{}</DefaultResult></member>",
            p.hook,
            p.hook_settings.heartbeat_timeout.as_secs(),
            p.hook_settings.global_timeout().as_secs(),
            p.hook_settings.default_result,
        ));
    }
    let body = format!(
        "<DescribeLifecycleHooksResponse xmlns=\"{XMLNS}\"><DescribeLifecycleHooksResult><LifecycleHooks>{members}</LifecycleHooks></DescribeLifecycleHooksResult><ResponseMetadata><RequestId>00000000-0000-4000-8000-000000000002</RequestId></ResponseMetadata></DescribeLifecycleHooksResponse>"
    );
    (StatusCode::OK, [("content-type", "text/xml")], body).into_response()
}

/// The groups and lifecycle states of the instances named (`InstanceIds.member.N`) that have
/// lifecycle actions here; `None` when none has, for moto to answer (its own groups).
fn describe_instances(
    state: &AppState,
    field: &impl Fn(&str) -> Option<String>,
) -> Option<Response> {
    let wanted: Vec<String> = (1..)
        .map_while(|i| field(&format!("InstanceIds.member.{i}")))
        .collect();
    let mut inner = lock(&state.inner);
    let now = Instant::now();
    inner.pending.iter_mut().for_each(|p| p.expire(now));
    let mut members = String::new();
    for id in &wanted {
        let Some(action) = inner.pending.iter().rev().find(|p| &p.instance_id == id) else {
            continue;
        };
        members.push_str(&format!(
            "<member><InstanceId>{id}</InstanceId><InstanceType>m5.large</InstanceType><AutoScalingGroupName>{}</AutoScalingGroupName><AvailabilityZone>{TEST_REGION}a</AvailabilityZone><LifecycleState>{}</LifecycleState><HealthStatus>HEALTHY</HealthStatus><ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>",
            action.group,
            action.lifecycle_state(),
        ));
    }
    if members.is_empty() {
        return None;
    }
    let body = format!(
        "<DescribeAutoScalingInstancesResponse xmlns=\"{XMLNS}\"><DescribeAutoScalingInstancesResult><AutoScalingInstances>{members}</AutoScalingInstances></DescribeAutoScalingInstancesResult><ResponseMetadata><RequestId>00000000-0000-4000-8000-000000000003</RequestId></ResponseMetadata></DescribeAutoScalingInstancesResponse>"
    );
    Some((StatusCode::OK, [("content-type", "text/xml")], body).into_response())
}

fn xml_error(code: &str, message: &str) -> Response {
    let body = format!(
        "<ErrorResponse xmlns=\"{XMLNS}\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>00000000-0000-4000-8000-000000000000</RequestId></ErrorResponse>"
    );
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "text/xml")],
        body,
    )
        .into_response()
}

fn xml_ok(action: &str) -> Response {
    let body = format!(
        "<{action}Response xmlns=\"{XMLNS}\"><{action}Result/><ResponseMetadata><RequestId>00000000-0000-4000-8000-000000000001</RequestId></ResponseMetadata></{action}Response>"
    );
    (StatusCode::OK, [("content-type", "text/xml")], body).into_response()
}

async fn handle(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    // EKS and Lambda are REST services: the action is in the path, not the form.
    let cluster = (method == Method::GET)
        .then(|| uri.path().strip_prefix("/clusters/"))
        .flatten()
        .map(str::to_owned);
    let invoked = (method == Method::POST)
        .then(|| uri.path().strip_prefix("/2015-03-31/functions/"))
        .flatten()
        .and_then(|rest| rest.strip_suffix("/invocations"))
        .map(str::to_owned);
    let action = match (&cluster, &invoked) {
        (Some(_), _) => "DescribeCluster".to_owned(),
        (_, Some(_)) => "Invoke".to_owned(),
        _ => field("Action").unwrap_or_default(),
    };
    lock(&state.inner)
        .actions
        .push((Instant::now(), action.clone()));
    let delay = take(&mut lock(&state.inner).delays, &action);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let fault = take(&mut lock(&state.inner).faults, &action);
    if let Some(code) = fault {
        // EC2's error document; its throttling answer is a 503.
        let body = format!(
            "<Response><Errors><Error><Code>{code}</Code><Message>injected</Message></Error></Errors><RequestID>0</RequestID></Response>"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/xml")],
            body,
        )
            .into_response();
    }
    if let Some(name) = cluster {
        return describe_cluster(&state, &name);
    }
    if invoked.is_some() {
        return invoke(&state, &headers, &body);
    }
    if action == "CompleteLifecycleAction" || action == "RecordLifecycleActionHeartbeat" {
        return lifecycle(&state, &action, &field);
    }
    if action == "DescribeLifecycleHooks" {
        return describe_hooks(&state, &field);
    }
    if action == "DescribeAutoScalingInstances" {
        if let Some(answer) = describe_instances(&state, &field) {
            return answer;
        }
    }
    proxy(&state, method, uri, headers, body).await
}

/// Lambda's Invoke, for the asynchronous (`Event`) type only: the payload is queued and the
/// caller told 202 Accepted.
fn invoke(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Response {
    let json_error = |status: StatusCode, code: &str, message: &str| {
        let body = serde_json::json!({ "Type": "User", "message": message });
        (
            status,
            [("x-amzn-errortype", code.to_owned())],
            axum::Json(body),
        )
            .into_response()
    };
    let kind = headers
        .get("x-amz-invocation-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("RequestResponse");
    if kind != "Event" {
        return json_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            "the rig serves asynchronous (Event) invocations only",
        );
    }
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(body) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            "Could not parse request body into json",
        );
    };
    let trace = headers
        .get("x-amzn-trace-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    lock(&state.inner).invoke_traces.push(trace);
    let Some(queue) = lock(&state.inner).invoke.clone() else {
        return json_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "Function not found",
        );
    };
    queue(payload);
    StatusCode::ACCEPTED.into_response()
}

/// EKS's answer, reduced to what a client of the cluster needs.
fn describe_cluster(state: &AppState, name: &str) -> Response {
    let name = percent_decode(name);
    let Some((endpoint, ca_data)) = lock(&state.inner).clusters.get(&name).cloned() else {
        let body = serde_json::json!({
            "__type": "ResourceNotFoundException",
            "message": format!("No cluster found for name: {name}."),
        });
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    };
    axum::Json(serde_json::json!({
        "cluster": {
            "name": name,
            "arn": format!("arn:aws:eks:{TEST_REGION}:123456789012:cluster/{name}"),
            "endpoint": endpoint,
            "certificateAuthority": { "data": ca_data },
            "status": "ACTIVE",
        }
    }))
    .into_response()
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .map(|(_, v)| v.into_owned())
        .next()
        .unwrap_or_default()
}

fn lifecycle(state: &AppState, action: &str, field: &impl Fn(&str) -> Option<String>) -> Response {
    let group = field("AutoScalingGroupName").unwrap_or_default();
    let hook = field("LifecycleHookName").unwrap_or_default();
    let instance_id = field("InstanceId").unwrap_or_default();
    let token = field("LifecycleActionToken").unwrap_or_default();
    let result = field("LifecycleActionResult");
    let mut inner = lock(&state.inner);
    let now = Instant::now();
    inner.pending.iter_mut().for_each(|p| p.expire(now));
    let response = if instance_id.is_empty() && token.is_empty() {
        xml_error(
            "ValidationError",
            "Either InstanceId or LifecycleActionToken must be specified",
        )
    } else if action == "CompleteLifecycleAction"
        && !matches!(result.as_deref(), Some("CONTINUE" | "ABANDON"))
    {
        xml_error(
            "ValidationError",
            "LifecycleActionResult must be CONTINUE or ABANDON",
        )
    } else {
        let found = inner.pending.iter_mut().find(|p| {
            p.completed.is_none()
                && p.group == group
                && p.hook == hook
                && (instance_id.is_empty() || p.instance_id == instance_id)
                && (token.is_empty() || p.token == token)
        });
        match found {
            None => xml_error(
                "ValidationError",
                &format!("No active Lifecycle Action found with instance ID {instance_id}"),
            ),
            Some(pending) => {
                if action == "CompleteLifecycleAction" {
                    pending.completed = Some((result.clone().unwrap_or_default(), now));
                } else {
                    pending.heartbeats.push(now);
                }
                xml_ok(action)
            }
        }
    };
    inner.calls.push(LifecycleCall {
        action: action.to_owned(),
        instance_id,
        token,
        result,
        status: response.status().as_u16(),
        at: now,
    });
    response
}

async fn proxy(
    state: &AppState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", state.moto));
    for (name, value) in &headers {
        if name != "host" {
            request = request.header(name, value);
        }
    }
    let Ok(request) = request.body(Body::from(body)) else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    match state.client.request(request).await {
        Ok(response) => response.map(Body::new).into_response(),
        Err(error) => (
            StatusCode::BAD_GATEWAY,
            format!("moto unreachable: {error}"),
        )
            .into_response(),
    }
}
