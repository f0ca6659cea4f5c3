//! Bodies on HTTP/2 streams, the same on both sides of the proxy (the
//! client-facing server in `h2_server.rs`, the upstream pool in
//! `upstream_h2.rs`): what arrives on a stream read as a body, and a body
//! sent on a stream, each within HTTP/2 flow control.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};

use crate::h2_tls::{BoxError, ProxyBody};

/// What arrives on a stream: data as it is taken (each read gives the peer
/// that much window back, so a slow reader slows the sender), then the
/// trailers.
pub(crate) struct Received {
    recv: h2::RecvStream,
    done: bool,
}

impl Received {
    pub(crate) fn new(recv: h2::RecvStream) -> Received {
        Received { recv, done: false }
    }
}

impl Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.recv.is_end_stream() {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {}
            }
        }
        let polled = self.recv.poll_trailers(cx);
        if polled.is_ready() {
            self.done = true;
        }
        polled.map(|trailers| match trailers {
            Ok(trailers) => trailers.map(|t| Ok(Frame::trailers(t))),
            Err(e) => Some(Err(e.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// What a body gave next, or the peer reset the stream.
enum Next {
    Frame(Frame<Bytes>),
    End,
    Failed,
    Reset,
}

/// Sends `body` on `out` as the peer's window allows (the body is read
/// only as fast as it is sent), then its trailers. Stops when the peer
/// resets the stream; a body that fails resets it with CANCEL (a drain
/// deadline's cut, a client gone).
pub(crate) async fn send_body(mut body: ProxyBody, mut out: h2::SendStream<Bytes>) {
    loop {
        let next = std::future::poll_fn(|cx| {
            if out.poll_reset(cx).is_ready() {
                return Poll::Ready(Next::Reset);
            }
            Pin::new(&mut body).poll_frame(cx).map(|frame| match frame {
                None => Next::End,
                Some(Err(_)) => Next::Failed,
                Some(Ok(frame)) => Next::Frame(frame),
            })
        })
        .await;
        let frame = match next {
            Next::Reset => return,
            Next::End => {
                let _ = out.send_data(Bytes::new(), true);
                return;
            }
            Next::Failed => {
                out.send_reset(h2::Reason::CANCEL);
                return;
            }
            Next::Frame(frame) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    out.reserve_capacity(data.len());
                    let granted = std::future::poll_fn(|cx| out.poll_capacity(cx)).await;
                    let Some(Ok(granted)) = granted else {
                        // Reset by the peer, or the connection ended.
                        return;
                    };
                    let chunk = data.split_to(granted.min(data.len()));
                    let last = data.is_empty() && body.is_end_stream();
                    if out.send_data(chunk, last).is_err() || last {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = out.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}
