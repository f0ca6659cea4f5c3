//! HTTPS: TLS terminated with rustls (the certificate chosen by SNI, ALPN
//! `h2` and `http/1.1`); the decrypted requests go through the same hyper
//! service as cleartext HTTP/2.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ResolvesServerCertUsingSni};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::local::{Busy, Local};

/// Certificates by server name, with the first one as the default.
#[derive(Debug)]
struct Resolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        let wildcard = name.split_once('.').map(|(_, rest)| format!("*.{rest}"));
        self.by_name
            .get(&name)
            .or_else(|| wildcard.and_then(|w| self.by_name.get(&w)))
            .cloned()
            .or_else(|| Some(self.default.clone()))
    }
}

/// The TLS acceptor for `[http.tls]`: every file read and checked now, so a
/// bad certificate is a startup (or reload) error naming the file.
pub(crate) fn acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut by_name = HashMap::new();
    let mut default = None;
    // Checks that each certificate is valid for the names it is given.
    let mut checker = ResolvesServerCertUsingSni::new();
    for (i, entry) in tls.certificates.iter().enumerate() {
        let at = format!("http.tls.certificates[{i}]");
        let certified = Arc::new(load(&provider, &entry.cert, &entry.key, &at)?);
        for name in &entry.names {
            checker
                .add(name, (*certified).clone())
                .map_err(|e| format!("{at}: the certificate is not valid for {name:?}: {e}"))?;
            by_name.insert(name.to_ascii_lowercase(), certified.clone());
        }
        default.get_or_insert(certified);
    }
    let default = default.ok_or("http.tls.certificates is empty")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("http.tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { by_name, default }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load(
    provider: &CryptoProvider,
    cert: &std::path::Path,
    key: &std::path::Path,
    at: &str,
) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{at}.cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{at}.cert {}: no certificate in the file",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{at}.key {}: {e}", key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{at}.key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{at}: the key does not belong to the certificate: {e}"))?;
    Ok(certified)
}

/// One HTTPS connection: the handshake (bounded by `header_timeout`), then
/// HTTP/2 or HTTP/1.1 as ALPN chose. The accept loop counted it as fresh: a
/// shutdown during the handshake gives it `FIRST_REQUEST_GRACE`, after it
/// waits for it like any request in progress.
pub(crate) async fn serve(
    local: Rc<Local>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let fresh = Busy::adopt_fresh(&local);
    let _ = stream.set_nodelay(true);
    local.shared.metrics.connections.inc();
    let limit = local.config().header_timeout;
    let handshake = tokio::time::timeout(limit, acceptor.accept(stream)).await;
    drop(fresh);
    match handshake {
        Ok(Ok(stream)) => {
            let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let _busy = Busy::enter(&local);
            local
                .h2_tls
                .clone()
                .serve_io(stream, http2, peer.ip(), "https", local.stop.clone())
                .await;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
    local.shared.metrics.connections.dec();
}
