//! The EKS bearer token: a presigned STS GetCallerIdentity URL, as `aws eks get-token` and
//! aws-iam-authenticator make it. The API server's authenticator replays the URL to STS and
//! maps the returned role to Kubernetes identities through the cluster's access entries.

use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use base64::Engine;
use std::sync::Mutex;

/// Prefix of every EKS token.
pub const TOKEN_PREFIX: &str = "k8s-aws-v1.";

/// The header that binds a token to one cluster; it must be among the signed headers.
pub const CLUSTER_ID_HEADER: &str = "x-k8s-aws-id";

/// What `aws eks get-token` asks for. EKS ignores it and accepts a token for 15 minutes
/// after its X-Amz-Date.
const PRESIGN_EXPIRES: Duration = Duration::from_secs(60);

/// A cached token is reused for 10 minutes, so even the last request made with it has five
/// minutes of the 15-minute validity left: no request can fail on an expiring token.
const TOKEN_REUSE: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no AWS credentials for the EKS token of cluster {cluster}: {source}")]
    Credentials {
        cluster: String,
        #[source]
        source: aws_credential_types::provider::error::CredentialsError,
    },
    #[error("presigning the EKS token for cluster {cluster}: {message}")]
    Sign { cluster: String, message: String },
}

/// A service's regional endpoint host; China regions live under their own domain.
fn regional_host(service: &str, region: &str) -> String {
    if region.starts_with("cn-") {
        format!("{service}.{region}.amazonaws.com.cn")
    } else {
        format!("{service}.{region}.amazonaws.com")
    }
}

/// `https://` + [`regional_host`], for calls made without an SDK client.
pub fn regional_endpoint(service: &str, region: &str) -> String {
    format!("https://{}", regional_host(service, region))
}

/// Presigns GetCallerIdentity for `cluster` and wraps it as an EKS token.
pub fn presign_token(
    cluster: &str,
    region: &str,
    credentials: Credentials,
    now: SystemTime,
) -> Result<String, TokenError> {
    let sign_error = |message: String| TokenError::Sign {
        cluster: cluster.to_owned(),
        message,
    };
    let identity = credentials.into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(PRESIGN_EXPIRES);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| sign_error(e.to_string()))?
        .into();
    let url = format!(
        "{}/?Action=GetCallerIdentity&Version=2011-06-15",
        regional_endpoint("sts", region)
    );
    let headers = [(CLUSTER_ID_HEADER, cluster)];
    let signable = SignableRequest::new("GET", &url, headers.into_iter(), SignableBody::Bytes(&[]))
        .map_err(|e| sign_error(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| sign_error(e.to_string()))?
        .into_parts();
    let mut request = http::Request::get(&url)
        .body(())
        .map_err(|e| sign_error(e.to_string()))?;
    instructions.apply_to_request_http1x(&mut request);
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(request.uri().to_string())
    ))
}

/// Mints tokens on demand and reuses one across requests and warm invocations.
pub struct TokenSource {
    cluster: String,
    region: String,
    credentials: SharedCredentialsProvider,
    cached: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself: it is a credential.
        f.debug_struct("TokenSource")
            .field("cluster", &self.cluster)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    pub fn new(cluster: String, region: String, credentials: SharedCredentialsProvider) -> Self {
        Self {
            cluster,
            region,
            credentials,
            cached: Mutex::new(None),
        }
    }

    pub async fn token(&self) -> Result<String, TokenError> {
        if let Some((token, minted)) = self.lock().as_ref() {
            if minted.elapsed() < TOKEN_REUSE {
                return Ok(token.clone());
            }
        }
        let credentials = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|source| TokenError::Credentials {
                cluster: self.cluster.clone(),
                source,
            })?;
        let token = presign_token(&self.cluster, &self.region, credentials, SystemTime::now())?;
        *self.lock() = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    /// Forgets the cached token, after the API server refused it (a clock far off, a
    /// token it no longer accepts): the next request carries a fresh one.
    pub fn invalidate(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, Instant)>> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(token: &str) -> url::Url {
        let encoded = token.strip_prefix(TOKEN_PREFIX).expect("prefix");
        assert!(!encoded.contains('='), "no padding");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .expect("base64url");
        url::Url::parse(&String::from_utf8(bytes).expect("utf8")).expect("url")
    }

    fn query(url: &url::Url, key: &str) -> Option<String> {
        url.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    #[test]
    fn token_is_a_presigned_get_caller_identity_bound_to_the_cluster() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "secret",
            Some("session".into()),
            None,
            "test",
        );
        let token = presign_token("prod", "us-east-1", creds, SystemTime::now()).expect("signs");
        let url = decode(&token);
        assert_eq!(url.scheme(), "https");
        assert_eq!(url.host_str(), Some("sts.us-east-1.amazonaws.com"));
        assert_eq!(query(&url, "Action").as_deref(), Some("GetCallerIdentity"));
        assert_eq!(query(&url, "X-Amz-Expires").as_deref(), Some("60"));
        let signed = query(&url, "X-Amz-SignedHeaders").expect("signed headers");
        assert!(signed.split(';').any(|h| h == "x-k8s-aws-id"), "{signed}");
        assert!(signed.split(';').any(|h| h == "host"), "{signed}");
        assert_eq!(
            query(&url, "X-Amz-Security-Token").as_deref(),
            Some("session")
        );
        assert_eq!(query(&url, "X-Amz-Signature").map(|s| s.len()), Some(64));
    }

    #[test]
    fn china_regions_use_their_own_sts_domain() {
        let creds = Credentials::new("AKID", "secret", None, None, "test");
        let url =
            decode(&presign_token("c", "cn-north-1", creds, SystemTime::now()).expect("signs"));
        assert_eq!(url.host_str(), Some("sts.cn-north-1.amazonaws.com.cn"));
    }
}
