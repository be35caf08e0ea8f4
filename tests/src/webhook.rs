//! A webhook receiver: records what nth sends, and can refuse (500) or hang, as real
//! receivers sometimes do.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Accept,
    Refuse,
    /// Never answers (within any sane timeout).
    Hang,
}

/// One request received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone)]
struct AppState {
    mode: Mode,
    received: Arc<Mutex<Vec<Received>>>,
}

#[derive(Debug)]
pub struct Receiver {
    /// The URL to configure as WEBHOOK_URL.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    pub async fn start(mode: Mode) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the webhook receiver")?;
        let url = format!(
            "http://{}/services/T000/B000/XXXXSECRETPATH",
            listener.local_addr()?
        );
        let received = Arc::new(Mutex::new(Vec::new()));
        let state = AppState {
            mode,
            received: Arc::clone(&received),
        };
        let app = Router::new()
            .route("/services/{a}/{b}/{c}", post(receive))
            .with_state(state);
        let server = tokio::spawn(async move {
            crate::serve_http(listener, app).await;
        });
        Ok(Self {
            url,
            received,
            server,
        })
    }

    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

async fn receive(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state
        .received
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Received { headers, body });
    match state.mode {
        Mode::Accept => StatusCode::OK,
        Mode::Refuse => StatusCode::INTERNAL_SERVER_ERROR,
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK
        }
    }
}
