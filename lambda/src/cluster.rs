//! A kube client for the EKS API server, built for a handler that owns its retries.
//!
//! kube's default stack retries 429 on its own; the drain must see every 429 (a
//! PodDisruptionBudget saying no) to pace its retries against the instance's deadline, so the
//! stack is assembled here: TLS verified against the cluster CA, a fresh EKS token on each
//! request (from the token cache), and firm timeouts.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderValue;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt;
use kube::Client;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tower::{BoxError, ServiceBuilder};

use crate::token::TokenSource;

/// Connecting to a healthy EKS endpoint takes milliseconds; five seconds means it is not
/// reachable (security group, private endpoint without a VPC attachment).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// No single API call of ours (GET, PATCH, LIST of one node's pods, eviction) should take
/// longer; a hung connection must not eat a two-minute Spot notice.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("CLUSTER_CA_DATA is not base64: {0}")]
    CaBase64(#[source] base64::DecodeError),
    #[error("CLUSTER_CA_DATA holds no PEM certificate")]
    CaEmpty,
    #[error("CLUSTER_ENDPOINT {endpoint:?} is not a URL: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("building the TLS client for {endpoint}: {source}")]
    Tls {
        endpoint: String,
        #[source]
        source: kube::Error,
    },
    #[error("loading kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
}

/// A client for an EKS endpoint, authenticated with tokens from `tokens`.
pub fn eks_client(
    endpoint: &str,
    ca_data: &str,
    tokens: Arc<TokenSource>,
) -> Result<Client, ClusterError> {
    let pem = base64::engine::general_purpose::STANDARD
        .decode(ca_data.trim())
        .map_err(ClusterError::CaBase64)?;
    let roots: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .map(|der| der.to_vec())
        .collect();
    if roots.is_empty() {
        return Err(ClusterError::CaEmpty);
    }
    let uri: http::Uri =
        endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClusterError::Endpoint {
                endpoint: endpoint.to_owned(),
                message: e.to_string(),
            })?;
    let mut config = kube::Config::new(uri);
    config.root_cert = Some(roots);
    config.default_retry = false;

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    let tls = config
        .rustls_client_config()
        .map_err(|source| ClusterError::Tls {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    // HTTP/2 when the server offers it (EKS does): one connection carries every concurrent
    // eviction instead of one TLS handshake per request in flight.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_all_versions()
        .wrap_connector(http);
    let hyper_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, kube::client::Body>(https);

    let refused = Arc::clone(&tokens);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .map_response(move |response: http::Response<hyper::body::Incoming>| {
            if response.status() == http::StatusCode::UNAUTHORIZED {
                refused.invalidate();
            }
            response
        })
        .layer(tower::filter::AsyncFilterLayer::new(
            move |mut request: http::Request<kube::client::Body>| {
                let tokens = Arc::clone(&tokens);
                async move {
                    let token = tokens.token().await?;
                    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))?;
                    value.set_sensitive(true);
                    request.headers_mut().insert(AUTHORIZATION, value);
                    Ok::<_, BoxError>(request)
                }
            },
        ))
        .timeout(REQUEST_TIMEOUT)
        .service(hyper_client);
    Ok(kube::client::ClientBuilder::new(service, "default").build())
}

/// A client from a kubeconfig file, for running the handler from a workstation.
pub async fn kubeconfig_client(path: &std::path::Path) -> Result<Client, ClusterError> {
    let error = |message: String| ClusterError::Kubeconfig {
        path: path.display().to_string(),
        message,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| error(e.to_string()))?;
    config.default_retry = false;
    config.read_timeout = Some(REQUEST_TIMEOUT);
    Client::try_from(config).map_err(|e| error(e.to_string()))
}
