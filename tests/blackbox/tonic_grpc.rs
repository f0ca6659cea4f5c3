//! Real gRPC through the proxy: tonic clients (a `Channel`, as applications
//! use it) and tonic's server-side codec on real HTTP/2 servers, messages
//! derived with prost's macros (no protoc). Unary calls of one channel spread
//! over every endpoint, metadata and trailers pass both ways, a server
//! stream arrives whole, and failures come back as gRPC statuses: the
//! server's own, and UNAVAILABLE with no endpoint.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use hyper::http::uri::PathAndQuery;
use tonic::{Code, Request, Response, Status};

use crate::proxy::agent_with;

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

type Reply<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;
type Messages = Pin<Box<dyn tokio_stream::Stream<Item = Result<Msg, Status>> + Send>>;

/// Answers `NAME: text` with the request's `x-user` back as metadata;
/// `fail` gets INVALID_ARGUMENT with metadata of its own.
struct Unary(&'static str);

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = Reply<Msg>;

    fn call(&mut self, request: Request<Msg>) -> Reply<Msg> {
        let name = self.0;
        Box::pin(async move {
            let user = request.metadata().get("x-user").cloned();
            let msg = request.into_inner();
            match msg.text.as_str() {
                "fail" => {
                    let mut status = Status::invalid_argument("no such thing");
                    status
                        .metadata_mut()
                        .insert("x-why", "test".parse().expect("ascii"));
                    Err(status)
                }
                text => {
                    let mut response = Response::new(Msg {
                        text: format!("{name}: {text}"),
                        count: 1,
                    });
                    if let Some(user) = user {
                        response.metadata_mut().insert("x-user", user);
                    }
                    Ok(response)
                }
            }
        })
    }
}

/// `Count`: `count` messages numbered from 1.
struct Count;

impl tonic::server::ServerStreamingService<Msg> for Count {
    type Response = Msg;
    type ResponseStream = Messages;
    type Future = Reply<Messages>;

    fn call(&mut self, request: Request<Msg>) -> Reply<Messages> {
        let n = request.into_inner().count;
        Box::pin(async move {
            let stream: Messages = Box::pin(tokio_stream::iter((1..=n).map(|i| {
                Ok(Msg {
                    text: format!("{i}"),
                    count: i,
                })
            })));
            Ok(Response::new(stream))
        })
    }
}

/// A gRPC server named `name` on a loopback port of its own (h2c), as long
/// as its runtime lives.
fn server(name: &'static str) -> (u16, tokio::runtime::Runtime) {
    let (addr, runtime) = crate::grpc::serve_loopback(move |tcp| async move {
        let service = hyper::service::service_fn(
            move |request: hyper::Request<hyper::body::Incoming>| async move {
                let mut grpc =
                    tonic::server::Grpc::new(tonic_prost::ProstCodec::<Msg, Msg>::default());
                let response = match request.uri().path() {
                    "/echo.Echo/Count" => grpc.server_streaming(Count, request).await,
                    _ => grpc.unary(Unary(name), request).await,
                };
                Ok::<_, Infallible>(response)
            },
        );
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
            .await;
    });
    (addr.port(), runtime)
}

/// A tonic client over one channel to the proxy.
struct Caller {
    runtime: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl Caller {
    fn new(proxy: std::net::SocketAddr) -> Caller {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let channel = runtime.block_on(async {
            tonic::transport::Channel::from_shared(format!("http://{proxy}"))
                .expect("uri")
                .connect()
                .await
                .expect("a channel to the proxy")
        });
        Caller {
            runtime,
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    fn unary(&mut self, request: Request<Msg>) -> Result<Response<Msg>, Status> {
        let grpc = &mut self.grpc;
        self.runtime.block_on(async {
            grpc.ready()
                .await
                .map_err(|e| Status::unknown(e.to_string()))?;
            grpc.unary(
                request,
                PathAndQuery::from_static("/echo.Echo/Say"),
                tonic_prost::ProstCodec::default(),
            )
            .await
        })
    }

    fn count(&mut self, n: u32) -> (Vec<Msg>, Option<tonic::metadata::MetadataMap>) {
        let grpc = &mut self.grpc;
        self.runtime.block_on(async {
            grpc.ready().await.expect("ready");
            let mut stream = grpc
                .server_streaming(
                    Request::new(Msg {
                        text: String::new(),
                        count: n,
                    }),
                    PathAndQuery::from_static("/echo.Echo/Count"),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .expect("a stream")
                .into_inner();
            let mut got = Vec::new();
            while let Some(msg) = stream.message().await.expect("a message") {
                got.push(msg);
            }
            (got, stream.trailers().await.expect("trailers"))
        })
    }
}

fn say(text: &str) -> Request<Msg> {
    Request::new(Msg {
        text: text.to_string(),
        count: 0,
    })
}

#[test]
fn tonic_calls_pass_the_proxy_balanced_per_call_with_their_metadata_and_statuses() {
    let (agent, _dir) = agent_with(
        "[http]\nbalancer = \"round_robin\"\n\
         [[http.routes]]\npath_prefix = \"/echo.Echo/\"\nservice = \"echo\"\n\
         [[http.routes]]\npath_prefix = \"/empty.Empty/\"\nservice = \"empty\"\n",
    );
    let servers = [server("g1"), server("g2"), server("g3")];
    crate::grpc::place_ports(
        &agent.client(),
        "echo",
        &[
            ("g1", servers[0].0),
            ("g2", servers[1].0),
            ("g3", servers[2].0),
        ],
        &[],
    );
    let mut caller = Caller::new(agent.http);

    // One channel, one connection: every endpoint gets calls.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let reply = caller.unary(say(&format!("hi {i}"))).expect("a reply");
        let text = reply.into_inner().text;
        let (name, rest) = text.split_once(": ").expect("NAME: text");
        assert_eq!(rest, format!("hi {i}"));
        *seen.entry(name.to_string()).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        3,
        "calls of one channel over every endpoint: {seen:?}"
    );
    assert!(seen.values().all(|&n| n == 10), "{seen:?}");

    // Metadata both ways.
    let mut request = say("who");
    request
        .metadata_mut()
        .insert("x-user", "ada".parse().expect("ascii"));
    let reply = caller.unary(request).expect("a reply");
    assert_eq!(
        reply.metadata().get("x-user").and_then(|v| v.to_str().ok()),
        Some("ada")
    );

    // A server stream, whole, with its trailers.
    let (messages, trailers) = caller.count(50);
    assert_eq!(
        messages.iter().map(|m| m.count).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    assert!(trailers.is_some(), "the stream's trailers arrive");

    // The server's own status and its metadata.
    let status = caller.unary(say("fail")).expect_err("a failure");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "no such thing");
    assert_eq!(
        status.metadata().get("x-why").and_then(|v| v.to_str().ok()),
        Some("test")
    );

    // (`grpc-timeout`: tonic's channel enforces its own deadline at the
    // same instant, so grpc.rs tests the proxy's with a raw HTTP/2 client.)
}

#[test]
fn a_tonic_call_to_a_service_without_endpoints_is_unavailable() {
    let (agent, _dir) = agent_with("[[http.routes]]\nservice = \"nowhere\"\n");
    let mut caller = Caller::new(agent.http);
    let status = caller.unary(say("anyone")).expect_err("no endpoint");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().is_empty(), "it says why: {status:?}");
}
