//! The token webhook the API server consults about every bearer token it does not know, as
//! EKS's API server consults aws-iam-authenticator: `k8s-aws-v1.` tokens are checked with the
//! emulator's verifier and mapped to the identity an EKS access entry gives nth's role.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::kube::auth::{self, AuthConfig};

/// The role session an access entry maps the function's role to.
pub const EKS_USERNAME: &str = "arn:aws:sts::123456789012:assumed-role/nth/nth";
/// The group `deploy/rbac.yaml` binds, as the function's access entry names it.
pub const EKS_GROUP: &str = "nth-node-termination-handler";

#[derive(Debug, Default)]
pub(super) struct Authn {
    clusters: Mutex<BTreeSet<String>>,
    seen: Mutex<Seen>,
}

/// The webhook's decisions since the current lease began.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub tokens: Vec<String>,
    pub failures: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has failed already; keep answering.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Authn {
    pub fn new(cluster: &str) -> Self {
        let authn = Self::default();
        authn.accept_cluster(cluster);
        authn
    }

    pub fn accept_cluster(&self, cluster: &str) {
        lock(&self.clusters).insert(cluster.to_owned());
    }

    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    /// Accepted when the token was signed for any accepted cluster; else every cluster's
    /// reason for refusing it.
    fn review(&self, token: &str) -> Result<(), String> {
        let header = format!("Bearer {token}");
        let clusters = lock(&self.clusters).clone();
        let mut refusals = Vec::new();
        for cluster in clusters {
            let config = AuthConfig {
                cluster_name: cluster,
                secret_access_key: Some(crate::TEST_SECRET_KEY.to_owned()),
            };
            match auth::verify(Some(&header), &config, auth::TOKEN_LIFETIME_SECS) {
                Ok(()) => return Ok(()),
                Err(why) => refusals.push(why),
            }
        }
        refusals.dedup();
        Err(refusals.join("; "))
    }
}

/// Serves the webhook on a free loopback port (plain HTTP: the API server takes the URL from
/// the webhook's kubeconfig as it is); returns the port.
pub(super) async fn serve(authn: Arc<Authn>) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding the token webhook")?;
    let port = listener.local_addr()?.port();
    let app = Router::new()
        .route("/authenticate", post(token_review))
        .with_state(authn);
    tokio::spawn(crate::serve_http(listener, app));
    Ok(port)
}

async fn token_review(State(authn): State<Arc<Authn>>, Json(review): Json<Value>) -> Json<Value> {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let status = match authn.review(token) {
        Ok(()) => {
            let mut seen = authn.seen();
            if !seen.tokens.iter().any(|t| t == token) {
                seen.tokens.push(token.to_owned());
            }
            json!({
                "authenticated": true,
                "user": {
                    "username": EKS_USERNAME,
                    "uid": "aws-iam-authenticator:123456789012:AROANTHTESTROLE0000001",
                    "groups": [EKS_GROUP, "system:authenticated"],
                },
            })
        }
        Err(why) => {
            authn.seen().failures.push(why.clone());
            json!({"authenticated": false, "error": why})
        }
    };
    Json(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "status": status,
    }))
}
