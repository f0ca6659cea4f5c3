//! Response compression (issue 32, item 7): negotiated by Accept-Encoding
//! q-values, streamed, never for encoded bodies, ranges, other types or
//! small bodies, always with `Vary: Accept-Encoding`; on every transport.

use std::collections::HashMap;
use std::io::Read;

use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame};

use crate::policy::{send, Via};
use crate::proxy::{agent_with, TestPki};

/// The JSON body every compressible path serves (64 KiB and a bit).
fn json_body() -> Vec<u8> {
    let mut body = b"[".to_vec();
    let mut i = 0;
    while body.len() < 64 * 1024 {
        body.extend_from_slice(
            format!("{{\"id\":{i},\"name\":\"item {i}\",\"ok\":true}},").as_bytes(),
        );
        i += 1;
    }
    body.extend_from_slice(b"{}]");
    body
}

/// An endpoint with one path per case.
fn upstream() -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let body = json_body();
                        let reply = hyper::Response::builder();
                        let reply = match request.uri().path() {
                            "/json" => reply
                                .header("content-type", "application/json")
                                .header("etag", "\"v1\"")
                                .body(body),
                            "/chunked" => {
                                // Streamed in pieces, length unknown.
                                let pieces: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                                    body.chunks(5000)
                                        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                                        .collect();
                                let stream = StreamBody::new(futures_util::stream::iter(pieces));
                                return Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .header("content-type", "text/plain; charset=utf-8")
                                        .body(stream.boxed())
                                        .expect("response"),
                                );
                            }
                            "/small" => reply
                                .header("content-type", "application/json")
                                .body(body[..100].to_vec()),
                            "/png" => reply.header("content-type", "image/png").body(body),
                            "/encoded" => reply
                                .header("content-type", "text/plain")
                                .header("content-encoding", "br")
                                .body(body),
                            "/range" => reply
                                .status(206)
                                .header("content-type", "text/plain")
                                .header(
                                    "content-range",
                                    format!("bytes 0-{}/99999", body.len() - 1),
                                )
                                .body(body),
                            _ => reply.status(404).body(Vec::new()),
                        }
                        .expect("response");
                        let (parts, body) = reply.into_parts();
                        Ok(hyper::Response::from_parts(
                            parts,
                            http_body_util::Full::new(Bytes::from(body))
                                .map_err(|never| match never {})
                                .boxed(),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, runtime)
}

/// `method path` on c.test with Accept-Encoding `accept`: status, headers
/// (lowercase), body as received (still encoded).
fn fetch(
    via: Via,
    (http, https): (std::net::SocketAddr, std::net::SocketAddr),
    pki: &TestPki,
    method: &str,
    path: &str,
    accept: Option<&str>,
) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "c.test");
    if let Some(accept) = accept {
        request = request.header("accept-encoding", accept);
    }
    let request = request.body(Empty::<Bytes>::new()).expect("request");
    send(via, http, https, pki, request)
}

fn decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_end(&mut out),
        "br" => brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out),
        "zstd" => zstd::stream::read::Decoder::new(bytes)
            .expect("zstd")
            .read_to_end(&mut out),
        other => panic!("unexpected coding {other}"),
    }
    .unwrap_or_else(|e| panic!("{coding} does not decode: {e}"));
    out
}

#[test]
fn responses_are_compressed_as_the_client_asks_on_every_transport() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().expect("tempdir");
    let config = [
        pki.https_listener(certs.path(), "c.test"),
        "[[http.routes]]\nhost = \"c.test\"\nservice = \"web\"\n\
         compress = [\"zstd\", \"br\", \"gzip\"]\n"
            .to_string(),
    ]
    .concat();
    let (agent, _dir) = agent_with(&config);
    let https = agent.https.expect("https listener");
    let (addr, _runtime) = upstream();
    crate::grpc::place_ports(&agent.client(), "web", &[("u1", addr.port())], &[]);
    let original = json_body();
    for via in [Via::Http1, Via::H2c, Via::TlsH2, Via::TlsHttp1] {
        let at = |method: &str, path: &str, accept: Option<&str>| {
            fetch(via, (agent.http, https), &pki, method, path, accept)
        };
        for (accept, coding) in [
            ("gzip, deflate, br, zstd", Some("zstd")),
            ("gzip, br", Some("br")),
            ("gzip", Some("gzip")),
            ("zstd;q=0.1, br;q=0.5, gzip;q=1.0", Some("gzip")),
            ("zstd;q=0, br;q=0, gzip;q=0", None),
            ("identity", None),
        ] {
            for path in ["/json", "/chunked"] {
                let (status, headers, body) = at("GET", path, Some(accept));
                assert_eq!(status, 200, "{via:?} {path} {accept}");
                assert_eq!(
                    headers.get("vary").map(String::as_str),
                    Some("accept-encoding"),
                    "{via:?} {path} {accept}"
                );
                match coding {
                    Some(coding) => {
                        assert_eq!(
                            headers.get("content-encoding").map(String::as_str),
                            Some(coding),
                            "{via:?} {path} {accept}"
                        );
                        assert!(
                            !headers.contains_key("content-length"),
                            "{via:?} {path}: {headers:?}"
                        );
                        assert!(
                            body.len() < original.len() / 4,
                            "{via:?} {path} {accept}: {} bytes",
                            body.len()
                        );
                        assert!(
                            decode(coding, &body) == original,
                            "{via:?} {path} {accept}: decoded differs"
                        );
                    }
                    None => {
                        assert!(
                            !headers.contains_key("content-encoding"),
                            "{via:?} {path} {accept}"
                        );
                        assert!(body == original, "{via:?} {path} {accept}");
                    }
                }
            }
        }
        // A strong validator of a body that changed becomes weak.
        let (_, headers, _) = at("GET", "/json", Some("gzip"));
        assert_eq!(headers["etag"], "W/\"v1\"", "{via:?}");
        // Without Accept-Encoding: as it is, still varying.
        let (_, headers, body) = at("GET", "/json", None);
        assert!(
            !headers.contains_key("content-encoding") && body == original,
            "{via:?}"
        );
        assert_eq!(headers["vary"], "accept-encoding", "{via:?}");
        // Small bodies, other types, encoded bodies and ranges pass as they are.
        let (_, headers, body) = at("GET", "/small", Some("gzip"));
        assert!(
            !headers.contains_key("content-encoding") && body.len() == 100,
            "{via:?}"
        );
        assert_eq!(headers["vary"], "accept-encoding", "{via:?}");
        let (_, headers, body) = at("GET", "/png", Some("gzip"));
        assert!(
            !headers.contains_key("content-encoding") && body == original,
            "{via:?}"
        );
        assert!(
            !headers.contains_key("vary"),
            "{via:?}: not a compressible type"
        );
        let (_, headers, body) = at("GET", "/encoded", Some("gzip, br"));
        assert_eq!(
            headers["content-encoding"], "br",
            "{via:?}: the endpoint's own"
        );
        assert!(body == original, "{via:?}: not encoded twice");
        let (status, headers, body) = at("GET", "/range", Some("gzip"));
        assert_eq!(status, 206, "{via:?}");
        assert!(
            !headers.contains_key("content-encoding") && body == original,
            "{via:?}"
        );
        // HEAD: the head as it is.
        let (status, headers, _) = at("HEAD", "/json", Some("gzip"));
        assert_eq!(status, 200, "{via:?}");
        assert!(
            !headers.contains_key("content-encoding"),
            "{via:?}: {headers:?}"
        );
    }
}

#[test]
fn a_compressed_response_keeps_the_http1_connection() {
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"c.test\"\nservice = \"web\"\ncompress = [\"gzip\"]\n",
    );
    let (addr, _runtime) = upstream();
    crate::grpc::place_ports(&agent.client(), "web", &[("u1", addr.port())], &[]);
    // Two requests on one connection: the first's chunked body ends where
    // the second answer begins.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(agent.http)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .expect("http1");
        tokio::spawn(conn);
        for path in ["/chunked", "/json", "/png"] {
            let request = hyper::Request::get(path)
                .header("host", "c.test")
                .header("accept-encoding", "gzip")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            let gzip = response.headers().get("content-encoding").is_some();
            assert_eq!(
                response.headers().get("transfer-encoding").is_some(),
                gzip,
                "{path}"
            );
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let body = if gzip {
                decode("gzip", &body)
            } else {
                body.to_vec()
            };
            assert!(body == json_body(), "{path}");
        }
    });
}
