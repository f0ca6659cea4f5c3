//! The HTTP/2 codec (`h2_server.rs` facing clients, `upstream_h2.rs`
//! facing endpoints) on the wire: bodies far larger than every
//! flow-control window pass byte-exact both ways on concurrent streams, and raw frames probe what RFC 9113 asks of a server:
//! header blocks split over CONTINUATION, PING answered, a body that
//! disagrees with its content-length reset, an oversized header list
//! answered 431, and the connection errors (oversized frame, HPACK that
//! cannot be decoded, rapid reset) ended with GOAWAY and the right code.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::grpc::{place_ports, serve_loopback};
use crate::proxy::{agent_with, register, Upstream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn patterned(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i * 7 + i / 251 + seed) % 26) as u8)
        .collect()
}

/// Four concurrent 3 MiB uploads on one connection, each echoed back: 12
/// MiB each way through 1 MiB windows, so every byte depends on window
/// updates going out as bodies are read and coming in as the client reads.
/// Upstream over HTTP/1.1 (our pool) and over h2c (our HTTP/2 client,
/// whose windows are in the way too); clients with small and huge windows.
#[test]
fn large_bodies_cross_http2_byte_exact_beyond_every_window() {
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"big\"\nservice = \"big\"\n\n\
         [[http.routes]]\nhost = \"big2\"\nservice = \"big2\"\nupstream_protocol = \"h2c\"\n",
    );
    let c = agent.client();
    let up = Upstream::start("big1");
    register(&c, "big", &[&up], &[]);
    let (echo, _echo_runtime) = h2c_echo_server();
    place_ports(&c, "big2", &[("e1", echo.port())], &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // One client with the usual windows, one with 1 GiB windows (it
        // never gives window back during the test: only our own writes
        // may move the responses on).
        let (usual, _connection) = crate::support::h2c::<Full<Bytes>>(agent.http).await;
        let stream = tokio::net::TcpStream::connect(agent.http)
            .await
            .expect("connect");
        let (wide, connection) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .adaptive_window(false)
                .initial_stream_window_size(1 << 30)
                .initial_connection_window_size(1 << 30)
                .handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let calls = (0..8).map(|seed| {
            let mut sender = if seed < 4 {
                usual.clone()
            } else {
                wide.clone()
            };
            async move {
                let body = patterned(3 << 20, seed);
                let host = if seed % 2 == 0 { "big" } else { "big2" };
                let request = hyper::Request::post(format!("http://{host}/echo"))
                    .body(Full::new(Bytes::from(body.clone())))
                    .expect("request");
                let response = sender.send_request(request).await.expect("response");
                assert_eq!(response.status(), 200, "{host}");
                let echoed = response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                assert_eq!(echoed.len(), body.len(), "{host} stream {seed}: length");
                assert!(echoed == body, "{host} stream {seed}: the echo differs");
            }
        });
        tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all(calls),
        )
        .await
        .expect("the uploads finish");
        // A 16 MiB download alone on the wide client: the endpoint has it
        // all at once, the client sends nothing while it comes.
        let request = hyper::Request::get("http://big2/big")
            .body(Full::default())
            .expect("request");
        let download = async {
            let response = wide.clone().send_request(request).await.expect("response");
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        };
        let got = tokio::time::timeout(Duration::from_secs(20), download)
            .await
            .expect("the download finishes");
        assert!(got == patterned(16 << 20, 99), "the download differs");
    });
}

/// A client that asks for 16 MiB with windows wide enough for all of it,
/// then reads nothing for a while: the proxy's socket fills, and once the
/// client reads, the rest must follow with no frame from it to wake the
/// connection.
#[test]
fn a_client_that_reads_late_gets_all_of_a_large_download() {
    let (agent, _dir) = agent_with(
        "[[http.routes]]\nhost = \"big2\"\nservice = \"big2\"\nupstream_protocol = \"h2c\"\n",
    );
    let c = agent.client();
    let (echo, _echo_runtime) = h2c_echo_server();
    place_ports(&c, "big2", &[("e1", echo.port())], &[]);
    let mut wire = Wire::open(agent.http);
    // INITIAL_WINDOW_SIZE 2^31-1, and the connection's window as large.
    wire.send(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]);
    wire.send(0x8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes());
    let block = request_block(false, "big2", &[]);
    let mut block = block;
    // :path /big instead of / (static index 4 is "/").
    block[2] = 0x04;
    block.insert(3, 4);
    block.splice(4..4, b"/big".iter().copied());
    wire.send(HEADERS, END_STREAM | END_HEADERS, 1, &block);
    std::thread::sleep(Duration::from_secs(1));
    let mut got = 0usize;
    loop {
        let frame = wire.next().expect("the download goes on");
        if frame.2 != 1 {
            continue;
        }
        if frame.0 == DATA {
            got += frame.3.len();
        }
        if frame.0 == RST_STREAM {
            panic!("reset after {got} bytes");
        }
        if frame.1 & END_STREAM != 0 && matches!(frame.0, DATA | HEADERS) {
            break;
        }
    }
    assert_eq!(got, 16 << 20);
}

/// An h2c server that streams each request's body back as it arrives;
/// `/big` answers 16 MiB at once.
fn h2c_echo_server() -> (SocketAddr, tokio::runtime::Runtime) {
    serve_loopback(move |stream| async move {
        let service = hyper::service::service_fn(
            |request: hyper::Request<hyper::body::Incoming>| async move {
                let body = match request.uri().path() {
                    "/big" => Full::new(Bytes::from(patterned(16 << 20, 99)))
                        .map_err(|never| match never {})
                        .boxed(),
                    _ => request.into_body().boxed(),
                };
                Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
            },
        );
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
}

/// One raw HTTP/2 connection to the proxy.
struct Wire {
    stream: TcpStream,
    seen: Vec<u8>,
}

/// A frame read back: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

impl Wire {
    fn open(addr: SocketAddr) -> Wire {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(PREFACE).expect("preface");
        let mut wire = Wire {
            stream,
            seen: Vec::new(),
        };
        wire.send(0x4, 0, 0, &[]);
        wire
    }

    fn send(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8]) {
        let len = payload.len();
        let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(payload);
        // A connection the proxy ended may refuse more: what it sent before
        // is still read.
        let _ = self.stream.write_all(&frame);
    }

    /// The next frame, or None when the connection ends or goes quiet.
    fn next(&mut self) -> Option<Frame> {
        loop {
            if self.seen.len() >= 9 {
                let len = (usize::from(self.seen[0]) << 16)
                    | (usize::from(self.seen[1]) << 8)
                    | usize::from(self.seen[2]);
                if self.seen.len() >= 9 + len {
                    let frame: Vec<u8> = self.seen.drain(..9 + len).collect();
                    let id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                    return Some((frame[3], frame[4], id & 0x7fff_ffff, frame[9..].to_vec()));
                }
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.seen.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The first frame of `kind` (on `id`, when given), skipping others.
    fn until(&mut self, kind: u8, id: Option<u32>) -> Option<Frame> {
        while let Some(frame) = self.next() {
            if frame.0 == kind && id.is_none_or(|id| frame.2 == id) {
                return Some(frame);
            }
        }
        None
    }

    /// The error code of the GOAWAY that ends the connection.
    fn goaway_code(&mut self) -> Option<u32> {
        let (_, _, _, payload) = self.until(GOAWAY, None)?;
        Some(u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?))
    }
}

/// An HPACK string: length (7-bit prefix integer), then the bytes.
fn string(block: &mut Vec<u8>, raw: &[u8]) {
    let mut len = raw.len();
    if len < 127 {
        block.push(len as u8);
    } else {
        block.push(127);
        len -= 127;
        while len >= 128 {
            block.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        block.push(len as u8);
    }
    block.extend_from_slice(raw);
}

/// A request's header block: method (static index 2 GET, 3 POST), scheme
/// http, path /, :authority `host`, then literal fields.
fn request_block(post: bool, host: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![if post { 0x83 } else { 0x82 }, 0x86, 0x84, 0x01];
    string(&mut block, host.as_bytes());
    for (name, value) in fields {
        block.push(0x00);
        string(&mut block, name.as_bytes());
        string(&mut block, value.as_bytes());
    }
    block
}

fn rst_code(frame: &Frame) -> u32 {
    u32::from_be_bytes(frame.3[..4].try_into().expect("four bytes"))
}

#[test]
fn raw_frames_get_the_answers_rfc_9113_asks_for() {
    let (agent, _dir) = agent_with("[[http.routes]]\nhost = \"big\"\nservice = \"big\"\n");
    let c = agent.client();
    let up = Upstream::start("big1");
    register(&c, "big", &[&up], &[]);

    // A header block split over HEADERS and two CONTINUATIONs is one
    // request, answered 200 (HPACK static index 8).
    let mut wire = Wire::open(agent.http);
    let block = request_block(false, "big", &[("x-pad", &"p".repeat(40))]);
    let (a, rest) = block.split_at(5);
    let (b, c2) = rest.split_at(20);
    wire.send(HEADERS, END_STREAM, 1, a);
    wire.send(CONTINUATION, 0, 1, b);
    wire.send(CONTINUATION, END_HEADERS, 1, c2);
    let answer = wire.until(HEADERS, Some(1)).expect("an answer");
    assert_eq!(answer.3.first(), Some(&0x88), "200: {answer:?}");

    // PING is answered with an ACK carrying the same eight bytes.
    wire.send(PING, 0, 0, b"12345678");
    let pong = wire.until(PING, None).expect("a PING ACK");
    assert_eq!((pong.1, pong.3.as_slice()), (0x1, &b"12345678"[..]));

    // A body shorter than its content-length: the stream is reset with
    // PROTOCOL_ERROR (1).
    let block = request_block(true, "big", &[("content-length", "10")]);
    wire.send(HEADERS, END_HEADERS, 3, &block);
    wire.send(DATA, END_STREAM, 3, b"abc");
    let reset = wire.until(RST_STREAM, Some(3)).expect("a reset");
    assert_eq!(rst_code(&reset), 1);

    // A header list over 16 KiB gets 431 (a literal :status), and the
    // connection goes on.
    let big = "v".repeat(20 << 10);
    let block = request_block(false, "big", &[("x-big", &big)]);
    let (a, b) = block.split_at(16000);
    wire.send(HEADERS, END_STREAM, 5, a);
    wire.send(CONTINUATION, END_HEADERS, 5, b);
    let answer = wire.until(HEADERS, Some(5)).expect("an answer");
    assert_eq!(&answer.3[..5], &[0x08, 3, b'4', b'3', b'1'], "{answer:?}");
    let block = request_block(false, "big", &[]);
    wire.send(HEADERS, END_STREAM | END_HEADERS, 7, &block);
    let answer = wire.until(HEADERS, Some(7)).expect("an answer");
    assert_eq!(
        answer.3.first(),
        Some(&0x88),
        "200 after the 431: {answer:?}"
    );

    // Connection errors end the connection with GOAWAY and their code:
    // a frame above the 16 KiB maximum (FRAME_SIZE_ERROR, 6)...
    let mut wire = Wire::open(agent.http);
    wire.send(PING, 0, 0, &vec![0; 20_000]);
    assert_eq!(wire.goaway_code(), Some(0x6));
    // ...a header block that does not decode (index 0: COMPRESSION_ERROR)...
    let mut wire = Wire::open(agent.http);
    wire.send(HEADERS, END_STREAM | END_HEADERS, 1, &[0x80]);
    assert_eq!(wire.goaway_code(), Some(0x9));
    // ...DATA on stream 0 (PROTOCOL_ERROR)...
    let mut wire = Wire::open(agent.http);
    wire.send(DATA, 0, 0, b"x");
    assert_eq!(wire.goaway_code(), Some(0x1));
    // ...and requests reset as fast as they are opened (rapid reset,
    // ENHANCE_YOUR_CALM).
    let mut wire = Wire::open(agent.http);
    let block = request_block(false, "big", &[]);
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        wire.send(HEADERS, END_STREAM | END_HEADERS, id, &block);
        wire.send(RST_STREAM, 0, id, &8u32.to_be_bytes());
    }
    assert_eq!(wire.goaway_code(), Some(0xb));

    // The agent serves on.
    let mut wire = Wire::open(agent.http);
    wire.send(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &request_block(false, "big", &[]),
    );
    let answer = wire.until(HEADERS, Some(1)).expect("an answer");
    assert_eq!(answer.3.first(), Some(&0x88));
}
