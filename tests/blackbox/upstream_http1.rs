//! HTTP/1.1 endpoints behind HTTP/2 clients: the proxy's own HTTP/1.1
//! client on its HTTP/2 and TLS side. Every response framing comes through
//! decoded, a streamed request body goes in chunks and one of declared
//! length as it is, a HEAD answer has no body, interim answers are passed
//! over, connections are reused, and a connection the endpoint closes while
//! idle never fails a request.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use serde_json::json;

use crate::proxy::agent_with;

/// An HTTP/1.1 endpoint written by hand, to answer in each framing.
struct Raw {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl Raw {
    fn start() -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || serve(stream));
            }
        });
        Raw { addr, accepted }
    }
}

/// Serves one connection's requests, each answered by its path.
fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let (method, path) = (
            words.next().unwrap_or("").to_string(),
            words.next().unwrap_or("").to_string(),
        );
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some(n) = header.strip_prefix("content-length: ") {
                length = n.parse().expect("content-length");
            }
            if header == "transfer-encoding: chunked" {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).expect("chunk size");
                let size = usize::from_str_radix(size.trim(), 16).expect("hex size");
                let mut chunk = vec![0; size + 2];
                reader.read_exact(&mut chunk).expect("chunk");
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length, 0);
            reader.read_exact(&mut body).expect("body");
        }
        let framing = if chunked { "chunked" } else { "length" };
        let answer = match (method.as_str(), path.as_str()) {
            ("HEAD", _) => "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_string(),
            (_, "/chunked") => {
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_string()
            }
            (_, "/close") => "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close".to_string(),
            (_, "/interim") => {
                "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string()
            }
            (_, "/bye") => "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye".to_string(),
            _ => {
                let text = format!("{framing} {}", String::from_utf8_lossy(&body));
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}", text.len())
            }
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
        match path.as_str() {
            "/close" => return,
            // Kept alive by the head, closed by the endpoint soon after:
            // the proxy's pooled connection goes stale.
            "/bye" => {
                std::thread::sleep(Duration::from_millis(2));
                return;
            }
            _ => {}
        }
    }
}

/// A request body of unknown length, in pieces.
struct Pieces(VecDeque<Bytes>);

impl Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|piece| Ok(Frame::data(piece))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[test]
fn http2_clients_reach_http1_endpoints_in_every_framing() {
    let raw = Raw::start();
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"h\"\nservice = \"raw\"\n");
    let c = agent.client();
    let batch = json!({"nodes": [{"name": "n1", "address": "127.0.0.1"}],
        "endpoints": [{"node": "n1", "service": "raw", "id": "raw1",
                       "address": "127.0.0.1", "port": raw.addr.port()}]});
    c.put_ok("/v1/switchyard/batch", &batch.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (mut sender, _) = crate::support::h2c::<
            http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
        >(agent.http)
        .await;
        let mut send = |method: &str,
                        path: &str,
                        body: http_body_util::combinators::BoxBody<
            Bytes,
            std::convert::Infallible,
        >| {
            let request = hyper::Request::builder()
                .method(method)
                .uri(format!("http://h{path}"))
                .body(body)
                .expect("request");
            let sent = sender.send_request(request);
            async move {
                let response = sent.await.expect("response");
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                (status, headers, String::from_utf8_lossy(&body).to_string())
            }
        };
        let empty = || Empty::<Bytes>::new().boxed();
        // Routed once the registration is in the proxy's snapshot.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _, _) = send("GET", "/", empty()).await;
            if status == 200 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never routed: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let (status, headers, body) = send("GET", "/chunked", empty()).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "hello world"),
            "a chunked answer, decoded"
        );
        assert_eq!(headers.get("x-a").map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert!(
            !headers.contains_key("transfer-encoding"),
            "no HTTP/1.1 framing on HTTP/2"
        );

        let (status, _, body) = send("GET", "/close", empty()).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "until close"),
            "an answer ended by the close"
        );

        let (status, _, body) = send("GET", "/interim", empty()).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "a 103 passed over");

        let (status, _, body) = send("HEAD", "/anything", empty()).await;
        assert_eq!(
            (status, body.as_str()),
            (200, ""),
            "HEAD: no body though a length is declared"
        );

        let (status, _, body) = send(
            "POST",
            "/echo",
            Full::new(Bytes::from_static(b"abc")).boxed(),
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (200, "length abc"),
            "a body of known length as is"
        );

        let pieces = Pieces(VecDeque::from([
            Bytes::from_static(b"str"),
            Bytes::from_static(b"eam"),
            Bytes::from_static(b"ed"),
        ]));
        let (status, _, body) = send("POST", "/echo", pieces.boxed()).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "chunked streamed"),
            "a body of unknown length in chunks"
        );

        // Requests one after another reuse the endpoint's connection (the
        // one HEAD left behind included).
        let before = raw.accepted.load(Ordering::SeqCst);
        for _ in 0..10 {
            let (status, _, body) = send("GET", "/echo", empty()).await;
            assert_eq!((status, body.as_str()), (200, "length "));
        }
        let opened = raw.accepted.load(Ordering::SeqCst) - before;
        assert!(opened <= 1, "10 requests opened {opened} connections");

        // The endpoint closes each connection right after answering, though
        // it kept it alive: no request fails for it.
        for i in 0..30 {
            let (status, _, body) = send("GET", "/bye", empty()).await;
            assert_eq!((status, body.as_str()), (200, "bye"), "request {i}");
            if i % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
}
