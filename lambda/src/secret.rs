//! The webhook URL from AWS Secrets Manager (WEBHOOK_URL_SECRET_ARN), so that a Slack or
//! Teams URL — a credential — need not sit in the function's environment. One signed
//! GetSecretValue call per container, made here with aws-sigv4 rather than through the
//! Secrets Manager SDK crate, which would add its whole client to the package for one call.
//!
//! The secret is the URL, or JSON: `{"url": "...", "headers": {"Authorization": "..."}}`, so
//! that a receiver's credential header need not sit in WEBHOOK_HEADERS either. The URL must be
//! `https://` unless WEBHOOK_ALLOW_HTTP=true, as for WEBHOOK_URL.

use serde_json::{json, Value};

use crate::config::{self, webhook_url_problem};
use crate::signed::{self, SignedCall};

#[derive(Debug, thiserror::Error)]
#[error("reading the webhook URL from secret {arn}: {message}")]
pub struct SecretError {
    arn: String,
    message: String,
}

/// What the secret holds. Its `Debug` shows neither the URL's path nor the headers' values.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretWebhook {
    pub url: String,
    /// From the JSON form's `headers` object; added to (and overriding) WEBHOOK_HEADERS.
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for SecretWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretWebhook")
            .field("url", &nth_core::notify::RedactedUrl(&self.url))
            .field("headers", &nth_core::notify::RedactedHeaders(&self.headers))
            .finish()
    }
}

/// The secret's string: a URL, or JSON with a `url` field and optional `headers` (an object
/// of strings). Errors never repeat the secret.
fn webhook_from_secret(secret: &str, allow_http: bool) -> Result<SecretWebhook, String> {
    let trimmed = secret.trim();
    let (url, headers) = if trimmed.starts_with('{') {
        let value: Value = serde_json::from_str(trimmed).map_err(|e| {
            format!(
                "the secret is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let url = value
            .get("url")
            .and_then(Value::as_str)
            .ok_or("the secret's JSON has no \"url\" string")?
            .to_owned();
        let headers = match value.get("headers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(name, value)| match value.as_str() {
                    Some(v) => Ok((name.clone(), v.to_owned())),
                    None => Err(format!("the secret's header {name:?} is not a string")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err("the secret's \"headers\" is not an object of strings".into()),
        };
        (url, headers)
    } else {
        (trimmed.to_owned(), Vec::new())
    };
    for (name, value) in &headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            return Err(format!(
                "the secret's header {name:?} is not a valid header"
            ));
        }
    }
    if let Some(why) = webhook_url_problem(&url, allow_http) {
        return Err(why);
    }
    Ok(SecretWebhook { url, headers })
}

/// The URL (and headers) the secret holds, checked as WEBHOOK_URL is.
pub async fn webhook_secret(
    aws: &aws_config::SdkConfig,
    arn: &str,
) -> Result<SecretWebhook, SecretError> {
    let error = |message: String| SecretError {
        arn: arn.to_owned(),
        message,
    };
    // The same switch as WEBHOOK_URL's, from the process environment (config.rs checked its
    // value when the configuration was read).
    let allow_http =
        config::webhook_allow_http(&config::env_lookup).map_err(|e| error(e.to_string()))?;
    let answer = signed::send(
        aws,
        SignedCall {
            action: "secretsmanager:GetSecretValue",
            service: "secretsmanager",
            method: "POST",
            path: "/",
            headers: &[
                ("content-type", "application/x-amz-json-1.1"),
                ("x-amz-target", "secretsmanager.GetSecretValue"),
            ],
            body: json!({ "SecretId": arn }).to_string(),
        },
    )
    .await
    .map_err(error)?;
    if !answer.status.is_success() {
        return Err(error(answer.error()));
    }
    let secret = answer
        .body
        .get("SecretString")
        .and_then(Value::as_str)
        .ok_or_else(|| error("the secret holds no SecretString with a URL".into()))?;
    webhook_from_secret(secret, allow_http).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(secret: &str) -> Option<String> {
        webhook_from_secret(secret, false).ok().map(|w| w.url)
    }

    #[test]
    fn the_secret_may_be_a_url_or_json_with_one() {
        assert_eq!(
            url(" https://hooks.slack.com/x \n").as_deref(),
            Some("https://hooks.slack.com/x")
        );
        assert_eq!(url(r#"{"url": "https://x"}"#).as_deref(), Some("https://x"));
        assert_eq!(url(r#"{"other": 1}"#), None);
    }

    #[test]
    fn the_secret_may_carry_headers() {
        let hook = webhook_from_secret(
            r#"{"url": "https://receiver.example/hook", "headers": {"Authorization": "Bearer XXXXSECRETTOKEN", "X-Team": "platform"}}"#,
            false,
        )
        .expect("valid");
        assert_eq!(
            hook.headers,
            vec![
                (
                    "Authorization".to_owned(),
                    "Bearer XXXXSECRETTOKEN".to_owned()
                ),
                ("X-Team".to_owned(), "platform".to_owned()),
            ]
        );
        let shown = format!("{hook:?}");
        assert!(
            !shown.contains("XXXXSECRET") && !shown.contains("/hook"),
            "{shown}"
        );
        for bad in [
            r#"{"url": "https://x", "headers": ["a"]}"#,
            r#"{"url": "https://x", "headers": {"A": 1}}"#,
            r#"{"url": "https://x", "headers": {"bad name": "v"}}"#,
            r#"{"url": "https://x", "headers": {"A": "line\nbreak"}}"#,
        ] {
            assert!(webhook_from_secret(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_secrets_url_is_https_unless_http_is_allowed() {
        let err = webhook_from_secret("http://hooks.example/XXXXSECRETPATH", false)
            .expect_err("http refused");
        assert!(
            err.contains("https") && !err.contains("XXXXSECRET"),
            "{err}"
        );
        assert!(webhook_from_secret(r#"{"url": "http://10.0.0.5/hook"}"#, true).is_ok());
        let err = webhook_from_secret(r#"{"url": "XXXXSECRET"#, false).expect_err("not JSON");
        assert!(!err.contains("XXXXSECRET"), "{err}");
    }
}
