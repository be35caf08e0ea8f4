//! Bearer-token checking as the EKS authenticator (aws-iam-authenticator) does it: the token
//! must be `k8s-aws-v1.` + base64url (no padding) of a presigned STS GetCallerIdentity URL,
//! signed for this cluster's `x-k8s-aws-id`, at most 15 minutes old. Where the real
//! authenticator asks STS to check the signature, the emulator knows the test credentials and
//! recomputes the SigV4 signature itself.

use base64::Engine;
use chrono::{NaiveDateTime, TimeZone, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The authenticator accepts a token for 15 minutes after its X-Amz-Date.
pub const TOKEN_LIFETIME_SECS: i64 = 15 * 60;
/// Tolerated clock skew for tokens dated in the future.
const CLOCK_SKEW_SECS: i64 = 5 * 60;
/// SHA-256 of an empty payload: what a presigned GET signs as its body.
const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub cluster_name: String,
    /// When set, the signature is verified with this secret key.
    pub secret_access_key: Option<String>,
}

fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks an `Authorization` header value; `Err` says why the token is refused.
/// Tokens older than `lifetime_secs` are refused (the authenticator's 15 minutes unless a
/// test shortens it).
pub fn verify(header: Option<&str>, config: &AuthConfig, lifetime_secs: i64) -> Result<(), String> {
    let header = header.ok_or("no Authorization header")?;
    let token = header.strip_prefix("Bearer ").ok_or("not a Bearer token")?;
    let encoded = token
        .strip_prefix("k8s-aws-v1.")
        .ok_or("token lacks the k8s-aws-v1. prefix")?;
    if encoded.contains('=') {
        return Err("token is padded; EKS tokens are base64url without padding".into());
    }
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| format!("token is not base64url: {e}"))?;
    let url = url::Url::parse(&String::from_utf8(decoded).map_err(|_| "token is not UTF-8")?)
        .map_err(|e| format!("token is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err("token URL is not https".into());
    }
    let host = url.host_str().unwrap_or_default().to_owned();
    let sts_host = host.starts_with("sts.")
        && (host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn"));
    if !sts_host || url.path() != "/" {
        return Err(format!(
            "token URL {host}{} is not an STS endpoint",
            url.path()
        ));
    }
    let params: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    if get("Action") != Some("GetCallerIdentity") || get("Version") != Some("2011-06-15") {
        return Err("token URL is not Action=GetCallerIdentity&Version=2011-06-15".into());
    }
    if get("X-Amz-Algorithm") != Some("AWS4-HMAC-SHA256") {
        return Err("token is not signed with AWS4-HMAC-SHA256".into());
    }
    let expires: i64 = get("X-Amz-Expires")
        .and_then(|e| e.parse().ok())
        .ok_or("X-Amz-Expires missing")?;
    if !(1..=900).contains(&expires) {
        return Err(format!("X-Amz-Expires={expires} is outside 1..=900"));
    }
    let signed_headers = get("X-Amz-SignedHeaders").ok_or("X-Amz-SignedHeaders missing")?;
    let signed: Vec<&str> = signed_headers.split(';').collect();
    if !signed.contains(&"x-k8s-aws-id") || !signed.contains(&"host") {
        return Err(format!(
            "x-k8s-aws-id and host must be signed, got {signed_headers}"
        ));
    }
    let date = get("X-Amz-Date").ok_or("X-Amz-Date missing")?;
    let signed_at = NaiveDateTime::parse_from_str(date, "%Y%m%dT%H%M%SZ")
        .map_err(|_| format!("X-Amz-Date {date:?} is not a SigV4 date"))?;
    let age = (Utc::now() - Utc.from_utc_datetime(&signed_at)).num_seconds();
    if !(-CLOCK_SKEW_SECS..=lifetime_secs).contains(&age) {
        return Err(format!(
            "token is {age} s old; the authenticator accepts {lifetime_secs} s"
        ));
    }
    let credential = get("X-Amz-Credential").ok_or("X-Amz-Credential missing")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [_, day, region, "sts", "aws4_request"] = scope.as_slice() else {
        return Err(format!(
            "credential scope {credential:?} is not <key>/<date>/<region>/sts/aws4_request"
        ));
    };
    let signature = get("X-Amz-Signature").ok_or("X-Amz-Signature missing")?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("X-Amz-Signature is not 64 hex digits".into());
    }
    let Some(secret) = &config.secret_access_key else {
        return Ok(());
    };
    // The authenticator forwards the URL to STS with x-k8s-aws-id set to its own cluster:
    // a token signed for another cluster fails there. Recompute what STS would.
    let mut query: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    query.sort();
    let canonical_query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut canonical_headers = String::new();
    for name in &signed {
        let value = match *name {
            "host" => host.clone(),
            "x-k8s-aws-id" => config.cluster_name.clone(),
            other => return Err(format!("unexpected signed header {other}")),
        };
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    let canonical_request = format!(
        "GET\n/\n{}\n{canonical_headers}\n{signed_headers}\n{EMPTY_PAYLOAD_SHA256}",
        canonical_query.join("&")
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{day}/{region}/sts/aws4_request\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let key = [*day, *region, "sts", "aws4_request"]
        .iter()
        .fold(format!("AWS4{secret}").into_bytes(), |key, part| {
            hmac(&key, part)
        });
    if hex(&hmac(&key, &string_to_sign)) != signature {
        return Err(format!(
            "signature does not match: token was not signed for cluster {:?} with the test credentials",
            config.cluster_name
        ));
    }
    Ok(())
}
