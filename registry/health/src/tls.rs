//! TLS for HTTPS and gRPC-over-TLS checks (rustls): the server's certificate
//! is verified against the Mozilla roots (webpki-roots) unless the check says
//! `TLSSkipVerify`; the name checked is `TLSServerName`, else the target's host.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Four client setups: verified or not, offering HTTP/1.1 or h2 by ALPN.
pub(super) struct TlsDialer {
    verified: [TlsConnector; 2],
    unverified: [TlsConnector; 2],
}

impl TlsDialer {
    pub(super) fn new() -> Result<TlsDialer, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let build = |verify: bool, alpn: &[u8]| -> Result<TlsConnector, rustls::Error> {
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?;
            let mut config = if verify {
                builder
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
                    .with_no_client_auth()
            };
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(TlsDialer {
            verified: [build(true, b"http/1.1")?, build(true, b"h2")?],
            unverified: [build(false, b"http/1.1")?, build(false, b"h2")?],
        })
    }

    /// Connects to `host:port` and completes the handshake for `name`.
    pub(super) async fn connect(
        &self,
        host: &str,
        port: u16,
        name: &str,
        skip_verify: bool,
        h2: bool,
    ) -> Result<TlsStream<TcpStream>, String> {
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("invalid TLS server name {name:?}: {e}"))?;
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let connectors = if skip_verify {
            &self.unverified
        } else {
            &self.verified
        };
        connectors[usize::from(h2)]
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))
    }
}

/// `TLSSkipVerify`: any certificate is accepted (signatures are still checked).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
