//! The webhook URL from AWS Secrets Manager (WEBHOOK_URL_SECRET_ARN), so that a Slack or
//! Teams URL — a credential — need not sit in the function's environment. One signed
//! GetSecretValue call per container, made here with aws-sigv4 rather than through the
//! Secrets Manager SDK crate, which would add its whole client to the package for one call.

use std::time::SystemTime;

use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
#[error("reading the webhook URL from secret {arn}: {message}")]
pub struct SecretError {
    arn: String,
    message: String,
}

/// The secret's string: a URL, or JSON with a `url` field.
fn url_from_secret(secret: &str) -> Option<String> {
    let trimmed = secret.trim();
    if trimmed.starts_with('{') {
        serde_json::from_str::<Value>(trimmed)
            .ok()?
            .get("url")?
            .as_str()
            .map(str::to_owned)
    } else {
        Some(trimmed.to_owned())
    }
}

pub async fn webhook_url(aws: &aws_config::SdkConfig, arn: &str) -> Result<String, SecretError> {
    let error = |message: String| SecretError {
        arn: arn.to_owned(),
        message,
    };
    let region = aws
        .region()
        .map(ToString::to_string)
        .ok_or_else(|| error("no AWS region".into()))?;
    let endpoint = aws
        .endpoint_url()
        .map(str::to_owned)
        .unwrap_or_else(|| crate::token::regional_endpoint("secretsmanager", &region));
    let credentials = aws
        .credentials_provider()
        .ok_or_else(|| error("no AWS credentials".into()))?
        .provide_credentials()
        .await
        .map_err(|e| error(e.to_string()))?;
    let body = json!({ "SecretId": arn }).to_string();
    let headers = [
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", "secretsmanager.GetSecretValue"),
    ];
    let identity = credentials.into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&region)
        .name("secretsmanager")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| error(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        "POST",
        &endpoint,
        headers.into_iter(),
        SignableBody::Bytes(body.as_bytes()),
    )
    .map_err(|e| error(e.to_string()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| error(e.to_string()))?
        .into_parts();
    let mut request = http::Request::post(&endpoint);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let mut request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| error(e.to_string()))?;
    instructions.apply_to_request_http1x(&mut request);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| error(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .build();
    let response = Client::builder(TokioExecutor::new())
        .build(https)
        .request(request)
        .await
        .map_err(|e| error(e.to_string()))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| error(e.to_string()))?
        .to_bytes();
    let answer: Value =
        serde_json::from_slice(&bytes).map_err(|e| error(format!("answer is not JSON: {e}")))?;
    if !status.is_success() {
        return Err(error(format!(
            "HTTP {status}: {}",
            answer
                .get("message")
                .or_else(|| answer.get("Message"))
                .and_then(Value::as_str)
                .unwrap_or("no message")
        )));
    }
    answer
        .get("SecretString")
        .and_then(Value::as_str)
        .and_then(url_from_secret)
        .ok_or_else(|| error("the secret holds no SecretString with a URL".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_may_be_a_url_or_json_with_one() {
        assert_eq!(
            url_from_secret(" https://hooks.slack.com/x \n").as_deref(),
            Some("https://hooks.slack.com/x")
        );
        assert_eq!(
            url_from_secret(r#"{"url": "https://x"}"#).as_deref(),
            Some("https://x")
        );
        assert_eq!(url_from_secret(r#"{"other": 1}"#), None);
    }
}
