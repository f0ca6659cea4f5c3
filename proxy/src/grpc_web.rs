//! gRPC-Web, as browsers send it (`application/grpc-web[+proto]`, and the
//! base64 `application/grpc-web-text[+proto]`), translated to gRPC for the
//! endpoint and back: the request's content type, its body decoded (text);
//! the answer's content type, its trailers sent as the body's last frame
//! (flag 0x80, then `name:value\r\n` lines), base64 per frame (text). With
//! `grpc_web = true` on a route (or the tag `switchyard.http.grpc_web=true`)
//! the proxy also answers CORS preflights and marks answers for the origin.

use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use crate::h2_tls::{answer, empty, BoxError, ProxyBody};

/// Largest `-text` request body decoded (it is taken whole).
const TEXT_MAX: usize = 4 << 20;

/// The two encodings of gRPC-Web.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Web {
    Binary,
    Text,
}

/// A gRPC-Web request's encoding and its message format (`+proto`, or
/// empty), from its content type.
pub(crate) fn kind(headers: &HeaderMap) -> Option<(Web, Box<str>)> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let rest = value.strip_prefix("application/grpc-web")?;
    let (web, format) = match rest.strip_prefix("-text") {
        Some(format) => (Web::Text, format),
        None => (Web::Binary, rest),
    };
    let format = format.split(';').next().unwrap_or_default().trim();
    (format.is_empty() || format.starts_with('+')).then(|| (web, format.into()))
}

/// The request as a gRPC call: content type `application/grpc{format}`, no
/// length (a decoded body has another), a `-text` body decoded. A body that
/// is not base64, or over 4 MiB, gets its answer instead.
pub(crate) async fn to_grpc<B>(
    request: Request<B>,
    web: Web,
    format: &str,
) -> Result<Request<ProxyBody>, Response<ProxyBody>>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove("x-grpc-web");
    if let Ok(value) = HeaderValue::from_str(&format!("application/grpc{format}")) {
        parts.headers.insert(CONTENT_TYPE, value);
    }
    let body = match web {
        Web::Binary => body.map_err(Into::into).boxed(),
        Web::Text => {
            let limited = http_body_util::Limited::new(body, TEXT_MAX);
            let text = match limited.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return Err(answer(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "grpc-web-text request body over 4 MiB or cut short".to_string(),
                    ))
                }
            };
            let text: Vec<u8> = text
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            match decode(&text) {
                Some(bytes) => Full::new(Bytes::from(bytes))
                    .map_err(|never| match never {})
                    .boxed(),
                None => {
                    return Err(answer(
                        StatusCode::BAD_REQUEST,
                        "grpc-web-text request body is not base64".to_string(),
                    ))
                }
            }
        }
    };
    Ok(Request::from_parts(parts, body))
}

/// Base64 as gRPC-Web clients send it: padded groups, possibly several
/// padded chunks one after another.
fn decode(text: &[u8]) -> Option<Vec<u8>> {
    let engine = &base64::engine::general_purpose::STANDARD;
    if let Ok(bytes) = engine.decode(text) {
        return Some(bytes);
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for group in text.chunks(4) {
        out.extend(engine.decode(group).ok()?);
    }
    Some(out)
}

/// The endpoint's gRPC answer as gRPC-Web: content type, and a body whose
/// last frame carries the trailers.
pub(crate) fn to_web(response: Response<ProxyBody>, web: Web, format: &str) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    let format = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .filter(|rest| rest.starts_with('+'))
        .map_or_else(
            || if format.is_empty() { "+proto" } else { format }.to_string(),
            str::to_string,
        );
    let kind = match web {
        Web::Binary => "application/grpc-web",
        Web::Text => "application/grpc-web-text",
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{kind}{format}")) {
        parts.headers.insert(CONTENT_TYPE, value);
    }
    let body = WebBody { inner: body, web }.boxed();
    Response::from_parts(parts, body)
}

/// An answer's body in gRPC-Web: data as it comes (base64 per frame for
/// `-text`), the trailers as a last frame.
struct WebBody {
    inner: ProxyBody,
    web: Web,
}

impl WebBody {
    fn encode(&self, bytes: Bytes) -> Bytes {
        match self.web {
            Web::Binary => bytes,
            Web::Text => Bytes::from(base64::engine::general_purpose::STANDARD.encode(&bytes)),
        }
    }
}

/// The trailers frame: flag 0x80, length, then `name:value\r\n` per field.
fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = Vec::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.push(b':');
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut frame = Vec::with_capacity(5 + block.len());
    frame.push(0x80);
    frame.extend_from_slice(&(block.len() as u32).to_be_bytes());
    frame.extend_from_slice(&block);
    Bytes::from(frame)
}

impl Body for WebBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let bytes = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => trailer_frame(&trailers),
                Err(_) => Bytes::new(),
            },
        };
        let bytes = self.encode(bytes);
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The answer to a CORS preflight for a gRPC-Web route: any origin that
/// asks, POST, the headers it asks for (or gRPC-Web's usual ones).
pub(crate) fn preflight(origin: &HeaderValue, asked: Option<&HeaderValue>) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert("access-control-allow-origin", origin.clone());
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        "access-control-allow-headers",
        asked.cloned().unwrap_or(HeaderValue::from_static(
            "content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization",
        )),
    );
    headers.insert("access-control-max-age", HeaderValue::from_static("86400"));
    headers.insert("vary", HeaderValue::from_static("origin"));
    headers.insert("x-switchyard", HeaderValue::from_static("proxy"));
    response
}

/// Marks an answer for `origin` (a gRPC-Web route's): the browser may read
/// it and its status fields.
pub(crate) fn allow(response: &mut Response<ProxyBody>, origin: HeaderValue) {
    let headers = response.headers_mut();
    headers.insert("access-control-allow-origin", origin);
    headers.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("grpc-status, grpc-message"),
    );
    headers.append("vary", HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_name_the_encoding_and_format() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_str(v).expect("value"));
            kind(&h)
        };
        assert_eq!(of("application/grpc-web"), Some((Web::Binary, "".into())));
        assert_eq!(
            of("application/grpc-web+proto"),
            Some((Web::Binary, "+proto".into()))
        );
        assert_eq!(
            of("application/grpc-web-text"),
            Some((Web::Text, "".into()))
        );
        assert_eq!(
            of("application/grpc-web-text+proto"),
            Some((Web::Text, "+proto".into()))
        );
        assert_eq!(of("application/grpc"), None);
        assert_eq!(of("application/grpc-webby"), None);
    }

    #[test]
    fn text_bodies_decode_whole_or_as_padded_chunks() {
        assert_eq!(
            decode(b"AAAAAAJoaQ=="),
            Some(vec![0, 0, 0, 0, 2, b'h', b'i'])
        );
        assert_eq!(decode(b"QQ==QUI="), Some(b"AAB".to_vec()));
        assert_eq!(decode(b"!!!!"), None);
    }

    #[test]
    fn trailers_become_the_last_frame() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frame = trailer_frame(&trailers);
        assert_eq!(&frame[..5], &[0x80, 0, 0, 0, 15]);
        assert_eq!(&frame[5..], b"grpc-status:0\r\n");
    }
}
