//! The HTTP client to other datacenters' agents: pooled keep-alive
//! connections, cleartext or TLS (verified against a CA file or the Mozilla
//! roots), one client per remote datacenter.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub(crate) type HttpClient = Client<Connect, Full<Bytes>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The base URI (scheme and authority) of an agent's API address as the
/// configuration gives it: `host:port` (cleartext), `http://host:port` or
/// `https://host:port`.
pub(crate) fn base_uri(address: &str) -> Result<Uri, String> {
    let text = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let uri: Uri = text.parse().map_err(|e| {
        format!("{address:?} is not an address (host:port or http(s)://host:port): {e}")
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{address:?}: the scheme must be http or https")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{address:?} names no host"));
    };
    if authority.port_u16().is_none() {
        return Err(format!("{address:?} names no port"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "{address:?}: give no path, only scheme, host and port"
        ));
    }
    Ok(uri)
}

/// The client of one datacenter (`ca_file`: its CA; none: the Mozilla roots).
pub(crate) fn client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("CA file {}: no certificate in it", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let connect = Connect {
        http,
        tls: TlsConnector::from(Arc::new(tls)),
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(32)
        .build(connect))
}

/// Connects over TCP, then TLS for `https` URIs.
#[derive(Clone)]
pub(crate) struct Connect {
    http: HttpConnector,
    tls: TlsConnector,
}

impl tower::Service<Uri> for Connect {
    type Response = Io;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Io, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = (uri.scheme_str() == Some("https")).then(|| self.tls.clone());
        let host = uri.host().unwrap_or_default().to_string();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(Io::Plain(TokioIo::new(tcp)));
            };
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())?;
            let stream = tls.connect(name, tcp).await?;
            Ok(Io::Tls(TokioIo::new(Box::new(stream))))
        })
    }
}

/// A connection to another datacenter's agent.
pub(crate) enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(TokioIo<Box<TlsStream<TcpStream>>>),
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        match self {
            Io::Plain(tcp) => tcp.inner().connected(),
            Io::Tls(tls) => tls.inner().get_ref().0.connected(),
        }
    }
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::base_uri;

    #[test]
    fn addresses_are_host_port_or_a_base_url() {
        assert_eq!(
            base_uri("127.0.0.1:8500").expect("plain").to_string(),
            "http://127.0.0.1:8500/"
        );
        assert_eq!(
            base_uri("https://dc2.example:8501")
                .expect("tls")
                .scheme_str(),
            Some("https")
        );
        assert!(base_uri("127.0.0.1").is_err(), "no port");
        assert!(base_uri("ftp://x:1").is_err(), "scheme");
        assert!(base_uri("http://x:1/v1").is_err(), "path");
        assert!(base_uri("not an address").is_err());
    }
}
