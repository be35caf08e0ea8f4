//! The few AWS calls made without an SDK client: each is one small JSON request, and an SDK
//! crate per call would add its whole client to the package. Requests are signed with
//! aws-sigv4 and sent to the service's regional endpoint, or to AWS_ENDPOINT_URL when set (as
//! the SDK clients do), so the emulated rig serves them like the rest.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tracing::debug;

/// One request. `action` is its IAM action (`eks:DescribeCluster`): it names the call in
/// errors, and the deployment checks read it to compare the role's permissions with the code.
#[derive(Debug)]
pub struct SignedCall<'a> {
    pub action: &'static str,
    /// The signing name and endpoint prefix (`eks`, `secretsmanager`, `lambda`).
    pub service: &'static str,
    pub method: &'static str,
    /// Path and query, from the endpoint's root.
    pub path: &'a str,
    pub headers: &'a [(&'static str, &'a str)],
    pub body: String,
}

/// How a call ended when the service answered.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    /// The answer's JSON, `Null` for an empty body.
    pub body: Value,
}

impl Answer {
    /// The service's error code (`ResourceNotFoundException`) and message, for a failure.
    pub fn error(&self) -> String {
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| self.body.get(*n).and_then(Value::as_str))
                .unwrap_or_default()
                .to_owned()
        };
        let code = field(&["__type", "code", "Code"]);
        let code = code.rsplit('#').next().unwrap_or_default();
        format!(
            "HTTP {}: {code} {}",
            self.status,
            field(&["message", "Message"])
        )
        .trim_end()
        .to_owned()
    }

    pub fn error_code(&self) -> Option<&str> {
        ["__type", "code", "Code"]
            .iter()
            .find_map(|n| self.body.get(*n).and_then(Value::as_str))
            .map(|c| c.rsplit('#').next().unwrap_or(c))
    }
}

/// `value` as one segment of a request path. A name taken from a tag or an event could hold
/// `/`, `..` or `?`; encoding all but letters, digits, `-` and `_` (all that EKS cluster and
/// Lambda function names use) keeps it from changing which resource the request names.
pub fn path_segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// One attempt of an AWS call, connection included: EC2, Auto Scaling, EKS and Lambda answer
/// these small calls in well under a second, so five seconds means the endpoint is not
/// answering (a VPC without the endpoint, a network fault), and another attempt is better
/// than waiting on.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A whole call with its retries: three attempts that time out, and the backoff between them.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(16);

/// Attempts of a call before its failure is reported, as the SDK clients' standard retry
/// mode makes them: throttling and server errors are usually gone within a second.
const ATTEMPTS: u32 = 3;

/// Before the second attempt; doubled before each later one.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Signs and sends `call`, again after a throttling answer, a server error or no answer. An
/// error here means no usable answer came; a service's refusal is an [`Answer`] with its
/// status.
pub async fn send(aws: &aws_config::SdkConfig, call: SignedCall<'_>) -> Result<Answer, String> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        let sent = tokio::time::timeout(ATTEMPT_TIMEOUT, send_once(aws, &call))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")));
        let transient = match &sent {
            Ok((status, _)) => {
                *status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            Err(_) => true,
        };
        if transient && attempt < ATTEMPTS {
            debug!(
                action = call.action,
                attempt, "AWS call failed; trying again"
            );
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
            continue;
        }
        let (status, bytes) = sent?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(body) => body,
                Err(_) if !status.is_success() => Value::Null,
                Err(e) => return Err(format!("answer is not JSON: {e}")),
            }
        };
        return Ok(Answer { status, body });
    }
}

async fn send_once(
    aws: &aws_config::SdkConfig,
    call: &SignedCall<'_>,
) -> Result<(http::StatusCode, Bytes), String> {
    let region = aws
        .region()
        .map(ToString::to_string)
        .ok_or("no AWS region")?;
    let endpoint = aws
        .endpoint_url()
        .map(|e| e.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| crate::token::regional_endpoint(call.service, &region));
    let url = format!("{endpoint}{}", call.path);
    let credentials = aws
        .credentials_provider()
        .ok_or("no AWS credentials")?
        .provide_credentials()
        .await
        .map_err(|e| format!("no AWS credentials: {e}"))?;
    let identity = credentials.into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&region)
        .name(call.service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        call.method,
        &url,
        call.headers.iter().copied(),
        SignableBody::Bytes(call.body.as_bytes()),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let mut request = http::Request::builder().method(call.method).uri(&url);
    for (name, value) in call.headers {
        request = request.header(*name, *value);
    }
    let mut request = request
        .body(Full::new(Bytes::from(call.body.clone())))
        .map_err(|e| e.to_string())?;
    instructions.apply_to_request_http1x(&mut request);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| e.to_string())?
        .https_or_http()
        .enable_http1()
        .build();
    let response = Client::builder(TokioExecutor::new())
        .build(https)
        .request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_cannot_change_the_path() {
        assert_eq!(path_segment("prod-1_a"), "prod-1_a");
        assert_eq!(path_segment("../x?y"), "%2E%2E%2Fx%3Fy");
        assert_eq!(
            path_segment("arn:aws:lambda:us-east-1:1:function:nth"),
            "arn%3Aaws%3Alambda%3Aus-east-1%3A1%3Afunction%3Anth"
        );
    }
}
