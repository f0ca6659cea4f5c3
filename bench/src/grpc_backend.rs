//! W-grpc's backend: a gRPC-shaped h2c server on one thread. Each call's
//! body is read whole and sent back as the answer, with `grpc-status: 0` in
//! the trailers; every candidate faces the same server.

use std::convert::Infallible;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Ports to serve on (127.0.0.1), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "18091,18092,18093")]
    ports: Vec<u16>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
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
            .map(|l| tokio::spawn(serve(l)))
            .collect();
        for accept in accepts {
            accept.await?;
        }
        anyhow::Ok(())
    })
}

async fn serve(listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let body = Full::new(body)
                        .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) });
                    let mut response = hyper::Response::new(body);
                    response
                        .headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    Ok::<_, Infallible>(response)
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(1000)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
