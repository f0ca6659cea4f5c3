//! W-grpc's backend: a gRPC-shaped h2c server on one thread. A unary call's
//! body is read whole and sent back as the answer, with `grpc-status: 0` in
//! the trailers; a call to a method named `Stream` is answered with
//! `--stream-messages` messages of `--stream-bytes` each (server streaming).
//! Every candidate faces the same server. `GET /_calls` (on any port)
//! answers the calls each port has served, as JSON, so a run can tell how
//! evenly a proxy spread them.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame};
use hyper::header::HeaderValue;
use hyper::HeaderMap;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Ports to serve on (127.0.0.1), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "18091,18092,18093")]
    ports: Vec<u16>,
    /// Messages in a server-streaming answer.
    #[arg(long, default_value_t = 16)]
    stream_messages: usize,
    /// Bytes of each streamed message.
    #[arg(long, default_value_t = 1 << 20)]
    stream_bytes: usize,
}

/// Calls served, per port (in the order of `Args::ports`).
struct Served {
    ports: Vec<u16>,
    calls: Vec<AtomicU64>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // One framed message, shared by every streamed answer.
    let mut message = Vec::with_capacity(5 + args.stream_bytes);
    message.push(0);
    message.extend_from_slice(&u32::try_from(args.stream_bytes)?.to_be_bytes());
    message.resize(5 + args.stream_bytes, b'x');
    let message = Bytes::from(message);
    let served = Arc::new(Served {
        ports: args.ports.clone(),
        calls: args.ports.iter().map(|_| AtomicU64::new(0)).collect(),
    });
    runtime.block_on(async {
        let mut listeners = Vec::new();
        for port in &args.ports {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", *port))
                .await
                .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
            listeners.push(listener);
        }
        println!("ready");
        let accepts: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(index, l)| {
                let stream = Stream {
                    left: args.stream_messages,
                    message: message.clone(),
                };
                tokio::spawn(serve(l, index, served.clone(), stream))
            })
            .collect();
        for accept in accepts {
            accept.await?;
        }
        anyhow::Ok(())
    })
}

fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers
}

async fn serve(
    listener: tokio::net::TcpListener,
    index: usize,
    served: Arc<Served>,
    stream: Stream,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let (served, stream) = (served.clone(), stream.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let (served, stream) = (served.clone(), stream.clone());
                    async move { Ok::<_, Infallible>(answer(request, index, &served, stream).await) }
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(1000)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}

type Answer = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
    index: usize,
    served: &Served,
    stream: Stream,
) -> hyper::Response<Answer> {
    if request.uri().path() == "/_calls" {
        let counts: serde_json::Map<String, serde_json::Value> = served
            .ports
            .iter()
            .zip(&served.calls)
            .map(|(port, calls)| (port.to_string(), calls.load(Ordering::Relaxed).into()))
            .collect();
        let text = serde_json::Value::Object(counts).to_string();
        return hyper::Response::new(Full::new(Bytes::from(text)).boxed());
    }
    served.calls[index].fetch_add(1, Ordering::Relaxed);
    let streaming = request.uri().path().ends_with("/Stream");
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = if streaming {
        stream.boxed()
    } else {
        Full::new(body)
            .with_trailers(async move { Some(Ok::<_, Infallible>(ok_trailers())) })
            .boxed()
    };
    let mut response = hyper::Response::new(body);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    response
}

/// A server-streaming answer: the same message `left` times, then the
/// trailers.
#[derive(Clone)]
struct Stream {
    left: usize,
    message: Bytes,
}

impl Body for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.left {
            usize::MAX => Poll::Ready(None),
            0 => {
                self.left = usize::MAX;
                Poll::Ready(Some(Ok(Frame::trailers(ok_trailers()))))
            }
            _ => {
                self.left -= 1;
                Poll::Ready(Some(Ok(Frame::data(self.message.clone()))))
            }
        }
    }
}
