//! A throwaway CA and server certificate, and an HTTPS server for an axum router, so that
//! clients verify the emulated API server exactly as they verify EKS's.

use std::sync::Arc;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// A CA (whose PEM the client trusts) and a server certificate for 127.0.0.1 and localhost.
#[derive(Debug)]
pub struct TestPki {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    /// The serving certificate (127.0.0.1 and localhost) and its key, as PEM for a server
    /// that reads files (the real kube-apiserver).
    pub server_cert_pem: String,
    pub server_key_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl TestPki {
    pub fn generate() -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "nth test cluster CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;

        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok(Self {
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
            server_cert: cert.der().clone(),
            server_key: key.serialize_der(),
        })
    }

    fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone())),
            )
            .context("building the emulator's TLS config")?;
        // As the real API server: HTTP/2 when the client offers it, else HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Serves `router` over HTTPS on `listener` until the task is aborted.
pub fn serve_https(
    listener: TcpListener,
    router: axum::Router,
    pki: &TestPki,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config()?));
    Ok(tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            // As Go's net/http (the API server's) does on every connection: small HTTP/2
            // frames go out at once instead of waiting on the peer's delayed ACK.
            let _best_effort = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = TowerToHyperService::new(router);
                let _closed = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }))
}
