//! TLS to the endpoints (`upstream_tls`, `upstream_protocol = "h2"`, or the
//! tags `switchyard.http.upstream_tls=true` / `switchyard.http.upstream=h2`):
//! the server name sent (SNI) and verified is a setting, default the
//! service's name; certificates are verified against the Mozilla roots
//! (webpki-roots) or a CA file; a client certificate makes it mutual TLS.
//! HTTP/1.1 or HTTP/2 is chosen by ALPN. Handshake failures are counted
//! per service in `switchyard_proxy_upstream_tls_failures_total{reason}`
//! and logged.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use prometheus::IntCounter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A route's TLS to its endpoints: one client setup per ALPN offer.
pub(crate) struct UpstreamTls {
    /// Distinguishes setups in each proxy thread's client cache (addresses
    /// of dropped setups are reused; ids are not).
    pub(crate) id: u64,
    pub(crate) name: ServerName<'static>,
    /// Offers `http/1.1`.
    http1: Arc<ClientConfig>,
    /// Offers `h2` (gRPC, and `upstream_protocol = "h2"`).
    h2: Arc<ClientConfig>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Where a route's TLS settings come from (config or tags).
#[derive(Clone, Copy)]
pub(crate) struct TlsSource<'a> {
    pub(crate) server_name: &'a str,
    pub(crate) ca_file: Option<&'a Path>,
    /// Certificate chain and key files, for mutual TLS.
    pub(crate) client: Option<(&'a Path, &'a Path)>,
}

impl UpstreamTls {
    /// Builds the setup; an error names the file or setting at fault.
    pub(crate) fn build(source: TlsSource<'_>) -> Result<UpstreamTls, String> {
        let name = ServerName::try_from(source.server_name.to_string())
            .map_err(|e| format!("upstream TLS server name {:?}: {e}", source.server_name))?;
        let mut roots = rustls::RootCertStore::empty();
        match source.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
                for cert in certs {
                    let cert =
                        cert.map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "upstream CA file {}: no certificate in it",
                        path.display()
                    ));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let client = match source.client {
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<_, _>>())
                    .map_err(|e| format!("upstream client certificate {}: {e}", cert.display()))?;
                if chain.is_empty() {
                    return Err(format!(
                        "upstream client certificate {}: no certificate in it",
                        cert.display()
                    ));
                }
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("upstream client key {}: {e}", key.display()))?;
                Some((chain, key))
            }
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |alpn: &[u8]| -> Result<Arc<ClientConfig>, String> {
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots.clone());
            let mut config = match &client {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .map_err(|e| format!("upstream client certificate: {e}"))?,
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        Ok(UpstreamTls {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            http1: config(b"http/1.1")?,
            h2: config(b"h2")?,
        })
    }
}

/// The TLS settings of one config route, built (files read) once per
/// loaded configuration, at its validation.
#[derive(Clone, Default)]
pub(crate) struct Built(Arc<OnceLock<Result<Arc<UpstreamTls>, String>>>);

impl Built {
    pub(crate) fn get_or_build(
        &self,
        build: impl FnOnce() -> Result<UpstreamTls, String>,
    ) -> Result<Arc<UpstreamTls>, String> {
        self.0.get_or_init(|| build().map(Arc::new)).clone()
    }
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Built")
    }
}

/// A service's TLS failure counters.
#[derive(Clone)]
pub(crate) struct Failures {
    pub(crate) service: Arc<str>,
    /// The certificate did not verify (unknown issuer, wrong name, expired).
    pub(crate) certificate: IntCounter,
    /// Anything else in the handshake (no common version or ALPN, reset).
    pub(crate) handshake: IntCounter,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The protocol a TLS connection offers (ALPN).
#[derive(Clone, Copy)]
pub(crate) enum Alpn {
    Http1,
    H2,
}

impl UpstreamTls {
    /// TLS over `tcp` offering only `alpn`.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
        alpn: Alpn,
        failures: &Failures,
    ) -> Result<TlsStream<TcpStream>, BoxError> {
        let config = match alpn {
            Alpn::Http1 => &self.http1,
            Alpn::H2 => &self.h2,
        };
        let tls = TlsConnector::from(config.clone());
        handshake(&tls, self.name.clone(), tcp, failures).await
    }
}

/// The TLS handshake over `tcp`; a failure is counted and logged, as a
/// certificate that did not verify or as any other handshake failure.
async fn handshake(
    tls: &TlsConnector,
    name: ServerName<'static>,
    tcp: TcpStream,
    failures: &Failures,
) -> Result<TlsStream<TcpStream>, BoxError> {
    let peer = tcp.peer_addr().ok();
    match tls.connect(name, tcp).await {
        Ok(stream) => Ok(stream),
        Err(e) => {
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|e| {
                    matches!(
                        e,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::NoCertificatesPresented
                    )
                });
            let reason = if certificate {
                failures.certificate.inc();
                "certificate"
            } else {
                failures.handshake.inc();
                "handshake"
            };
            tracing::warn!(service = %failures.service, ?peer, reason, error = %e, "upstream TLS handshake failed (switchyard_proxy_upstream_tls_failures_total)");
            Err(Box::new(e) as BoxError)
        }
    }
}

/// The TLS error somewhere in `error`'s chain: with TLS 1.3 an endpoint
/// refuses a client certificate after the client's handshake is done, so
/// the refusal arrives with the first response instead.
pub(crate) fn tls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error's `source` skips the error it wraps: look inside.
        if let Some(tls) = error
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = error.source();
    }
    None
}

/// A connection to an endpoint, in the clear or over TLS.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    /// TCP to `addr` (no Nagle), then TLS offering `alpn` when the route
    /// asks for it (`tls`).
    pub(crate) async fn connect(
        addr: std::net::SocketAddr,
        tls: Option<(&UpstreamTls, &Failures)>,
        alpn: Alpn,
    ) -> Result<Io, BoxError> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        Ok(match tls {
            None => Io::Plain(tcp),
            Some((tls, failures)) => Io::Tls(Box::new(tls.handshake(tcp, alpn, failures).await?)),
        })
    }

    /// The TCP connection under it.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
