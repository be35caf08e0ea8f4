//! The webhook URL from AWS Secrets Manager (WEBHOOK_URL_SECRET_ARN), so that a Slack or
//! Teams URL — a credential — need not sit in the function's environment. One signed
//! GetSecretValue call per container, made here with aws-sigv4 rather than through the
//! Secrets Manager SDK crate, which would add its whole client to the package for one call.

use serde_json::{json, Value};

use crate::signed::{self, SignedCall};

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
    answer
        .body
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
