//! Webhook notifications (Slack, Microsoft Teams, Amazon Chime, or plain JSON), sent when a
//! node is cordoned and when its drain ends. A webhook is a courtesy: a slow or failing
//! receiver costs at most two short timeouts and never fails a drain.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::{info, warn};

/// Per attempt. Chat services answer in well under a second; two seconds bounds what a
/// hung receiver can cost a two-minute Spot notice.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// One retry: enough for a dropped connection, not enough to hammer a receiver that is down.
const ATTEMPTS: usize = 2;

/// The message when no WEBHOOK_TEMPLATE is set.
pub const DEFAULT_TEMPLATE: &str = "nth: {kind} for instance {instance_id} (node {node}, cluster {cluster}), event {event_id} at {start_time}: {description}";

/// How the message is wrapped for the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"text": ...}`, Slack's incoming webhooks.
    Slack,
    /// A MessageCard, Microsoft Teams' incoming webhooks.
    Teams,
    /// `{"Content": ...}`, Amazon Chime's webhooks.
    Chime,
    /// Every field of the notice, plus the rendered `text`.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "slack" => Ok(Self::Slack),
            "teams" => Ok(Self::Teams),
            "chime" => Ok(Self::Chime),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown webhook format {other:?}: expected slack, teams, chime or json"
            )),
        }
    }
}

#[derive(Clone)]
pub struct WebhookSettings {
    pub url: String,
    /// Extra request headers (e.g. an authorization header for a generic receiver).
    pub headers: Vec<(String, String)>,
    pub format: Format,
    /// With `{placeholder}`s named after [`Notice`]'s fields.
    pub template: String,
    pub timeout: Duration,
}

/// Never the URL's path or query (for Slack, Teams and Chime the URL is the credential) nor
/// a header's value (an `Authorization` header): the scheme, host and header names only.
impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &RedactedUrl(&self.url))
            .field("headers", &RedactedHeaders(&self.headers))
            .field("format", &self.format)
            .field("template", &self.template)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A webhook URL for `{:?}`: `https://hooks.slack.com/<redacted>`, the scheme and host kept
/// (they help to tell receivers apart and are no secret), the rest never shown.
pub struct RedactedUrl<'a>(pub &'a str);

impl std::fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.trim().parse::<http::Uri>() {
            Ok(uri) if uri.host().is_some() => write!(
                f,
                "\"{}://{}/<redacted>\"",
                uri.scheme_str().unwrap_or("?"),
                uri.host().unwrap_or_default()
            ),
            _ => f.write_str("\"<redacted>\""),
        }
    }
}

/// Request headers for `{:?}`: their names, each value `<redacted>`.
pub struct RedactedHeaders<'a>(pub &'a [(String, String)]);

impl std::fmt::Debug for RedactedHeaders<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, _)| (name, "<redacted>")))
            .finish()
    }
}

/// What a message is about.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    pub event_id: String,
    pub kind: String,
    pub instance_id: String,
    pub node: String,
    pub cluster: String,
    pub start_time: DateTime<Utc>,
    pub description: String,
    /// `drained`, `drain-incomplete`, ... once the drain has ended.
    pub outcome: Option<String>,
    pub evicted: Option<usize>,
    pub left: Option<usize>,
}

impl Notice {
    /// Fills `{placeholder}`s; unknown ones are left as written, so a typo shows.
    pub fn render(&self, template: &str) -> String {
        let optional = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        let values = [
            ("{event_id}", self.event_id.clone()),
            ("{kind}", self.kind.clone()),
            ("{instance_id}", self.instance_id.clone()),
            ("{node}", self.node.clone()),
            ("{cluster}", self.cluster.clone()),
            ("{start_time}", self.start_time.to_rfc3339()),
            ("{description}", self.description.clone()),
            ("{outcome}", optional(self.outcome.clone())),
            ("{evicted}", optional(self.evicted.map(|n| n.to_string()))),
            ("{left}", optional(self.left.map(|n| n.to_string()))),
        ];
        values
            .iter()
            .fold(template.to_owned(), |text, (key, value)| {
                text.replace(key, value)
            })
    }

    fn body(&self, settings: &WebhookSettings) -> Value {
        let text = self.render(&settings.template);
        match settings.format {
            Format::Slack => json!({ "text": text }),
            Format::Teams => json!({
                "@type": "MessageCard",
                "@context": "http://schema.org/extensions",
                "summary": format!("nth: {} on {}", self.kind, self.node),
                "themeColor": if self.left.unwrap_or(0) > 0 { "D70000" } else { "0076D7" },
                "text": text,
            }),
            Format::Chime => json!({ "Content": text }),
            Format::Json => {
                let mut body = json!(self);
                body["text"] = json!(text);
                body
            }
        }
    }
}

#[derive(Clone)]
pub struct Webhook {
    settings: WebhookSettings,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: for Slack and Teams it is the credential.
        f.debug_struct("Webhook")
            .field("format", &self.settings.format)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// A client trusting the system's CA bundle. `http://` is accepted too: the Lambda's
    /// configuration refuses it unless WEBHOOK_ALLOW_HTTP says otherwise (a receiver inside
    /// a VPC, a test rig).
    pub fn new(settings: WebhookSettings) -> std::io::Result<Self> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(Self { settings, client })
    }

    /// Sends the notice, retrying once; failures are logged, never returned.
    pub async fn send(&self, notice: &Notice) {
        let body = notice.body(&self.settings).to_string();
        for attempt in 1..=ATTEMPTS {
            match tokio::time::timeout(self.settings.timeout, self.post(body.clone())).await {
                Ok(Ok(status)) if status.is_success() => {
                    info!(kind = %notice.kind, node = %notice.node, "webhook notified");
                    return;
                }
                Ok(Ok(status)) => warn!(
                    attempt,
                    status = status.as_u16(),
                    "webhook receiver refused the notice"
                ),
                Ok(Err(error)) => warn!(attempt, %error, "webhook request failed"),
                Err(_) => warn!(
                    attempt,
                    timeout_ms = self.settings.timeout.as_millis() as u64,
                    "webhook timed out"
                ),
            }
        }
        warn!(kind = %notice.kind, node = %notice.node, "webhook notice dropped after {ATTEMPTS} attempts");
    }

    async fn post(
        &self,
        body: String,
    ) -> Result<http::StatusCode, Box<dyn std::error::Error + Send + Sync>> {
        let mut request = http::Request::post(&self.settings.url);
        if let Some(headers) = request.headers_mut() {
            *headers = request_headers(&self.settings.headers)?;
        }
        let response = self
            .client
            .request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        Ok(response.status())
    }
}

/// `Content-Type: application/json`, then the configured headers, each replacing one of the
/// same name (as aws-node-termination-handler's WEBHOOK_HEADERS do): a receiver that wants
/// another content type gets exactly one.
fn request_headers(
    configured: &[(String, String)],
) -> Result<http::HeaderMap, Box<dyn std::error::Error + Send + Sync>> {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    for (name, value) in configured {
        headers.insert(
            http::HeaderName::try_from(name.as_str())?,
            http::HeaderValue::try_from(value.as_str())?,
        );
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice() -> Notice {
        Notice {
            event_id: "e1".into(),
            kind: "spot-interruption".into(),
            instance_id: "i-1".into(),
            node: "ip-10-0-0-1.ec2.internal".into(),
            cluster: "prod".into(),
            start_time: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            description: "cordoned".into(),
            outcome: None,
            evicted: Some(3),
            left: None,
        }
    }

    fn settings(format: Format, template: &str) -> WebhookSettings {
        WebhookSettings {
            url: "http://127.0.0.1:1/hook".into(),
            headers: Vec::new(),
            format,
            template: template.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    #[test]
    fn configured_headers_replace_the_default_content_type() {
        let configured = vec![
            ("content-type".to_owned(), "text/plain".to_owned()),
            ("X-Team".to_owned(), "platform".to_owned()),
        ];
        let headers = request_headers(&configured).expect("valid headers");
        let types: Vec<_> = headers.get_all(http::header::CONTENT_TYPE).iter().collect();
        assert_eq!(types, ["text/plain"]);
        assert_eq!(headers["x-team"], "platform");
        let default = request_headers(&[]).expect("valid headers");
        assert_eq!(default[http::header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn templates_fill_every_placeholder_and_mark_missing_values() {
        let text = notice().render(
            "{kind} {instance_id} {node} {cluster} {event_id} {evicted} {left} {outcome} {nope}",
        );
        assert_eq!(
            text,
            "spot-interruption i-1 ip-10-0-0-1.ec2.internal prod e1 3 - - {nope}"
        );
    }

    #[test]
    fn debug_output_never_shows_the_url_path_or_header_values() {
        let settings = WebhookSettings {
            url: "https://hooks.slack.com/services/T0/B0/XXXXSECRETPATH?code=XXXXSECRETQUERY"
                .into(),
            headers: vec![("Authorization".into(), "Bearer XXXXSECRETTOKEN".into())],
            format: Format::Slack,
            template: "t".into(),
            timeout: DEFAULT_TIMEOUT,
        };
        let shown = format!("{settings:?} {settings:#?}");
        assert!(!shown.contains("XXXXSECRET"), "{shown}");
        assert!(
            shown.contains("https://hooks.slack.com/<redacted>") && shown.contains("Authorization"),
            "{shown}"
        );
        let webhook = Webhook::new(settings).expect("client");
        let shown = format!("{webhook:?}");
        assert!(!shown.contains("XXXXSECRET"), "{shown}");
        assert_eq!(format!("{:?}", RedactedUrl("not a url")), "\"<redacted>\"");
    }

    #[test]
    fn each_format_has_its_receivers_shape() {
        let n = notice();
        assert!(n.body(&settings(Format::Slack, "hi"))["text"] == "hi");
        assert!(n.body(&settings(Format::Chime, "hi"))["Content"] == "hi");
        let teams = n.body(&settings(Format::Teams, "hi"));
        assert_eq!(teams["@type"], "MessageCard");
        assert_eq!(teams["text"], "hi");
        let plain = n.body(&settings(Format::Json, DEFAULT_TEMPLATE));
        assert_eq!(plain["instance_id"], "i-1");
        assert!(plain["text"].as_str().is_some_and(|t| t.contains("i-1")));
        assert!("Slack".parse::<Format>().is_ok() && "discord".parse::<Format>().is_err());
    }
}
