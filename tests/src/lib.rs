//! nth's integration rig: emulators that speak the real protocols over real HTTP, so the
//! real binaries and clients can be tested end to end on one machine.
//!
//! - [`kube`]: a Kubernetes API server emulator (HTTPS, EKS token checking, PDB arithmetic).
//! - [`runtime_api`]: the Lambda Runtime API, driving the real `nth-lambda` binary.
//! - [`moto`]: moto's server mode for EC2 and Auto Scaling, behind [`autoscaling`]'s front
//!   that serves the lifecycle calls moto lacks.
//! - [`sandbox`]: all of it wired together, for tests and the README's sandbox command.

pub mod autoscaling;
pub mod cluster;
pub mod envtest;
pub mod fixtures;
pub mod imds;
pub mod kube;
pub mod moto;
pub mod process;
pub mod runtime_api;
pub mod sandbox;
pub mod tls;
pub mod webhook;

use std::path::PathBuf;

/// Fake credentials: moto accepts any, and the API emulator verifies token signatures
/// with this secret.
pub const TEST_ACCESS_KEY: &str = "AKIANTHTESTEXAMPLE01";
pub const TEST_SECRET_KEY: &str = "nth-test-secret-key-not-a-real-one";
pub const TEST_SESSION_TOKEN: &str = "nth-test-session-token";
pub const TEST_REGION: &str = "us-east-1";

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Serves `app` over plain HTTP until the task is aborted, with TCP_NODELAY on every
/// connection, as the servers the rig stands in for have it (Go's net/http sets it on every
/// connection): without it, small answers can wait 40 ms on the peer's delayed ACK, which
/// real endpoints do not make anyone wait.
pub async fn serve_http(listener: tokio::net::TcpListener, app: axum::Router) {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _best_effort = tcp.set_nodelay(true);
    });
    let _stopped = axum::serve(listener, app).await;
}

/// A loopback port that was free a moment ago, for servers that cannot bind port 0
/// themselves (moto_server).
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// The test credentials, as a Lambda function's role hands them out.
pub fn test_credentials() -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(
        TEST_ACCESS_KEY,
        TEST_SECRET_KEY,
        Some(TEST_SESSION_TOKEN.to_owned()),
        None,
        "nth-tests",
    )
}

/// nth's own EKS client stack for the API server at `url` (TLS against `ca_pem`, presigned
/// `k8s-aws-v1.` tokens for `cluster` from the test credentials, no automatic 429 retry), as
/// the Lambda function builds it.
pub fn eks_client(url: &str, ca_pem: &str, cluster: &str) -> anyhow::Result<::kube::Client> {
    use base64::Engine;
    let tokens = std::sync::Arc::new(nth_lambda::token::TokenSource::new(
        cluster.to_owned(),
        TEST_REGION.to_owned(),
        aws_credential_types::provider::SharedCredentialsProvider::new(test_credentials()),
    ));
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    Ok(nth_lambda::cluster::eks_client(url, &ca_data, tokens)?)
}

/// A kubeconfig as an operator has one for an EKS cluster: the server, its CA and a
/// presigned token for `cluster` from the test credentials (valid 15 minutes).
pub fn eks_kubeconfig(url: &str, ca_pem: &str, cluster: &str) -> anyhow::Result<serde_json::Value> {
    let token = nth_lambda::token::presign_token(
        cluster,
        TEST_REGION,
        test_credentials(),
        std::time::SystemTime::now(),
    )?;
    Ok(kubeconfig(url, ca_pem, "nth", &token))
}

/// A kubeconfig for the API server at `url` whose user presents `token`.
pub fn kubeconfig(url: &str, ca_pem: &str, user: &str, token: &str) -> serde_json::Value {
    use base64::Engine;
    serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "nth-tests",
        "clusters": [{"name": "nth-tests", "cluster": {
            "server": url,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "nth-tests", "context": {"cluster": "nth-tests", "user": user}}],
    })
}
