//! Response compression: `compress = ["zstd", "br", "gzip"]` on a route, in
//! its order of preference, chosen by the client's `Accept-Encoding`
//! q-values, for `compress_types` (default text, JSON, JavaScript, XML and
//! SVG) and bodies of at least `compress_min_bytes` (default 1 KiB; a body
//! of unknown length is compressed). Never a response already encoded, a
//! range, one marked `no-transform`, or the answer to HEAD; every response
//! of a compressible type says `Vary: Accept-Encoding`, compressed or not.
//!
//! Bodies stream through an encoder as they arrive (`Encoder`): nothing
//! waits for the whole body. gzip runs at level 1, as nginx's `gzip on`
//! does; brotli at quality 4; zstd at level 3.

use std::io::Write;

/// A content coding the proxy can apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    pub(crate) fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    fn parse(text: &str) -> Option<Coding> {
        match text {
            "zstd" => Some(Coding::Zstd),
            "br" => Some(Coding::Br),
            "gzip" => Some(Coding::Gzip),
            _ => None,
        }
    }
}

/// A route's compression settings.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Compress {
    /// In the route's order of preference.
    order: Box<[Coding]>,
    /// Media types, lowercase; `type/*` covers a whole type.
    types: Box<[Box<str>]>,
    min_bytes: u64,
}

/// The default `compress_types`.
const TEXT_TYPES: [&str; 7] = [
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/x-javascript",
    "application/manifest+json",
    "image/svg+xml",
];

/// What becomes of one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Not a compressible type (or no body): as it is.
    AsIs,
    /// A compressible type the proxy does not compress (the client takes no
    /// coding of the route's, it is encoded already, a range, too small):
    /// `Vary: Accept-Encoding` added.
    Vary,
    /// Compressed with this coding.
    Compress(Coding),
}

/// What `decide` reads of a response head.
#[derive(Debug, Default)]
pub(crate) struct HeadFacts<'h> {
    pub(crate) status: u16,
    pub(crate) content_type: Option<&'h [u8]>,
    pub(crate) content_encoding: Option<&'h [u8]>,
    pub(crate) content_length: Option<u64>,
    pub(crate) content_range: bool,
    pub(crate) cache_control: Option<&'h [u8]>,
}

impl Compress {
    /// A route's settings, `None` without `compress`; an error names the key.
    pub(crate) fn from_config(
        compress: &[String],
        types: Option<&[String]>,
        min_bytes: Option<u64>,
    ) -> Result<Option<Compress>, String> {
        if compress.is_empty() {
            if types.is_some() || min_bytes.is_some() {
                return Err("compress_types and compress_min_bytes need compress".to_string());
            }
            return Ok(None);
        }
        let mut order = Vec::new();
        for name in compress {
            let coding = Coding::parse(&name.to_ascii_lowercase()).ok_or_else(|| {
                format!("compress: {name:?} is not one of \"zstd\", \"br\", \"gzip\"")
            })?;
            if order.contains(&coding) {
                return Err(format!("compress: {name:?} is listed twice"));
            }
            order.push(coding);
        }
        let types: Box<[Box<str>]> = match types {
            Some(list) => {
                for t in list {
                    let ok = t
                        .split_once('/')
                        .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty());
                    if !ok {
                        return Err(format!(
                            "compress_types: {t:?} is not a media type (type/subtype or type/*)"
                        ));
                    }
                }
                list.iter()
                    .map(|t| t.trim().to_ascii_lowercase().into_boxed_str())
                    .collect()
            }
            None => TEXT_TYPES.iter().map(|t| Box::from(*t)).collect(),
        };
        Ok(Some(Compress {
            order: order.into_boxed_slice(),
            types,
            min_bytes: min_bytes.unwrap_or(1024),
        }))
    }

    /// The coding to use for a client that sent `accept` (its
    /// Accept-Encoding): of the route's, the one with the highest q-value
    /// above 0, the route's order breaking ties. `None`: the client takes
    /// none of them.
    pub(crate) fn negotiate(&self, accept: Option<&[u8]>) -> Option<Coding> {
        let accept = accept?;
        let mut best: Option<(Coding, u32)> = None;
        for &coding in self.order.iter() {
            let q = quality(accept, coding.token());
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((coding, q));
            }
        }
        best.map(|(c, _)| c)
    }

    /// What to do with a response of `head` to a request (not HEAD) whose
    /// client takes `coding`.
    pub(crate) fn decide(&self, head: &HeadFacts<'_>, coding: Option<Coding>) -> Decision {
        let status = head.status;
        if status < 200 || status == 204 || status == 304 {
            return Decision::AsIs;
        }
        let Some(kind) = head.content_type else {
            return Decision::AsIs;
        };
        if !self.covers(kind) {
            return Decision::AsIs;
        }
        let encoded = head
            .content_encoding
            .is_some_and(|e| !e.trim_ascii().eq_ignore_ascii_case(b"identity"));
        let no_transform = head.cache_control.is_some_and(|c| {
            c.split(|b| *b == b',')
                .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
        });
        let small = head.content_length.is_some_and(|n| n < self.min_bytes);
        match coding {
            Some(coding)
                if !encoded && !no_transform && !small && !head.content_range && status != 206 =>
            {
                Decision::Compress(coding)
            }
            _ => Decision::Vary,
        }
    }

    fn covers(&self, content_type: &[u8]) -> bool {
        let media = content_type
            .split(|b| *b == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        self.types.iter().any(|t| match t.strip_suffix("/*") {
            Some(major) => {
                media.len() > major.len()
                    && media[..major.len()].eq_ignore_ascii_case(major.as_bytes())
                    && media[major.len()] == b'/'
            }
            None => media.eq_ignore_ascii_case(t.as_bytes()),
        })
    }
}

/// Rewrites an HTTP/1.1 response head (ending in an empty line) for its
/// body compressed with `coding` (its length and framing replaced by
/// chunked, its ETag made weak), or only marked as varying on
/// Accept-Encoding (`coding` none); `vary` adds that mark.
pub(crate) fn rewrite_head(head: &mut Vec<u8>, coding: Option<Coding>, vary: bool) {
    let mut out = Vec::with_capacity(head.len() + 96);
    let mut lines = head.split_inclusive(|b| *b == b'\n');
    if let Some(status) = lines.next() {
        out.extend_from_slice(status);
    }
    for line in lines {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let name = line
            .iter()
            .position(|b| *b == b':')
            .map_or(&line[..0], |colon| &line[..colon]);
        let is = |wanted: &str| name.eq_ignore_ascii_case(wanted.as_bytes());
        if coding.is_some() {
            if is("content-length") || is("transfer-encoding") {
                continue;
            }
            if is("etag") {
                let value = line[name.len() + 1..].trim_ascii_start();
                if value.starts_with(b"\"") {
                    out.extend_from_slice(b"etag: W/");
                    out.extend_from_slice(value);
                    continue;
                }
            }
        }
        out.extend_from_slice(line);
    }
    if let Some(coding) = coding {
        out.extend_from_slice(b"content-encoding: ");
        out.extend_from_slice(coding.token().as_bytes());
        out.extend_from_slice(b"\r\ntransfer-encoding: chunked\r\n");
    }
    if vary {
        out.extend_from_slice(b"vary: accept-encoding\r\n");
    }
    out.extend_from_slice(b"\r\n");
    *head = out;
}

/// Whether a Vary header's value names Accept-Encoding (or `*`).
pub(crate) fn varies(value: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|v| {
        let v = v.trim_ascii();
        v == b"*" || v.eq_ignore_ascii_case(b"accept-encoding")
    })
}

/// The q-value (0 to 1000) `accept` gives `coding`: its own entry, else
/// `*`'s, else 0.
fn quality(accept: &[u8], coding: &str) -> u32 {
    let mut wildcard = None;
    for entry in accept.split(|b| *b == b',') {
        let mut parts = entry.split(|b| *b == b';');
        let name = parts.next().unwrap_or(b"").trim_ascii();
        // No q: 1; a q that is not one: 0 (not accepted).
        let q = parts
            .find_map(|p| {
                let p = p.trim_ascii();
                p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q="))
            })
            .map_or(1000, |v| parse_q(v).unwrap_or(0));
        if name.eq_ignore_ascii_case(coding.as_bytes()) {
            return q;
        }
        if name == b"*" {
            wildcard = Some(q);
        }
    }
    wildcard.unwrap_or(0)
}

/// `0`, `0.5`, `1.000` as thousandths; anything else is no value.
fn parse_q(text: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(text).ok()?.trim();
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u32 = match whole {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    let mut thousandths = 0;
    for (i, d) in frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .enumerate()
    {
        thousandths += u32::from(d - b'0') * [100, 10, 1][i];
    }
    let q = whole * 1000 + thousandths;
    (q <= 1000).then_some(q)
}

/// Body bytes an encoder may take in without giving any out before it is
/// flushed: what one response holds back at most.
const HOLD_AT_MOST: usize = 64 * 1024;

/// Window of the brotli and zstd encoders (512 KiB, as nginx's brotli
/// module): their memory per response stays about a megabyte.
const WINDOW_LOG: u32 = 19;

/// A streaming encoder writing into a buffer the caller drains.
pub(crate) struct Encoder {
    kind: Kind,
    /// Bytes taken in since it last gave some out.
    held: usize,
}

enum Kind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    pub(crate) fn new(coding: Coding) -> std::io::Result<Encoder> {
        let kind = match coding {
            Coding::Gzip => Kind::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(1),
            )),
            Coding::Br => Kind::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                4,
                WINDOW_LOG,
            ))),
            Coding::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
                encoder.window_log(WINDOW_LOG)?;
                Kind::Zstd(encoder)
            }
        };
        Ok(Encoder { kind, held: 0 })
    }

    fn sink(&mut self) -> &mut Vec<u8> {
        match &mut self.kind {
            Kind::Gzip(e) => e.get_mut(),
            Kind::Br(e) => e.get_mut(),
            Kind::Zstd(e) => e.get_mut(),
        }
    }

    /// Feeds body bytes in. An encoder that has taken `HOLD_AT_MOST`
    /// without giving anything out is flushed, so a response streams.
    pub(crate) fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match &mut self.kind {
            Kind::Gzip(e) => e.write_all(data)?,
            Kind::Br(e) => e.write_all(data)?,
            Kind::Zstd(e) => e.write_all(data)?,
        }
        self.held += data.len();
        if !self.sink().is_empty() {
            self.held = 0;
        } else if self.held >= HOLD_AT_MOST {
            match &mut self.kind {
                Kind::Gzip(e) => e.flush()?,
                Kind::Br(e) => e.flush()?,
                Kind::Zstd(e) => e.flush()?,
            }
            self.held = 0;
        }
        Ok(())
    }

    /// The compressed bytes made so far, moved into `out` (appended).
    pub(crate) fn drain_into(&mut self, out: &mut Vec<u8>) {
        out.append(self.sink());
    }

    /// Ends the stream; the last compressed bytes appended to `out`.
    pub(crate) fn finish_into(self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let mut rest = match self.kind {
            Kind::Gzip(e) => e.finish()?,
            Kind::Br(e) => e.into_inner(),
            Kind::Zstd(e) => e.finish()?,
        };
        out.append(&mut rest);
        Ok(())
    }
}

/// A response body compressed as it streams (HTTP/2 and TLS clients):
/// each data frame goes through the encoder, whatever it has made so far
/// goes on; trailers pass after the last compressed bytes.
pub(crate) struct CompressedBody<B> {
    inner: B,
    encoder: Option<Encoder>,
    trailers: Option<hyper::HeaderMap>,
}

impl<B> CompressedBody<B> {
    pub(crate) fn new(inner: B, encoder: Encoder) -> CompressedBody<B> {
        CompressedBody {
            inner,
            encoder: Some(encoder),
            trailers: None,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> hyper::body::Body for CompressedBody<B>
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = BoxError> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>> {
        use hyper::body::Frame;
        use std::task::Poll;
        let this = &mut *self;
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            let mut out = Vec::new();
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        encoder.write(&data)?;
                        encoder.drain_into(&mut out);
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.trailers = Some(trailers);
                        }
                    }
                },
                Poll::Ready(None) => {
                    if let Some(encoder) = this.encoder.take() {
                        encoder.finish_into(&mut out)?;
                    }
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from(out)))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn route(codings: &[&str]) -> Compress {
        let list: Vec<String> = codings.iter().map(|c| c.to_string()).collect();
        Compress::from_config(&list, None, None)
            .expect("valid")
            .expect("on")
    }

    #[test]
    fn the_client_s_q_values_choose_and_the_route_breaks_ties() {
        let c = route(&["zstd", "br", "gzip"]);
        let pick = |accept: &str| c.negotiate(Some(accept.as_bytes()));
        assert_eq!(pick("gzip, deflate, br, zstd"), Some(Coding::Zstd));
        assert_eq!(pick("gzip, br"), Some(Coding::Br));
        assert_eq!(pick("gzip;q=1.0, br;q=0.5"), Some(Coding::Gzip));
        assert_eq!(pick("br;q=0, gzip"), Some(Coding::Gzip));
        assert_eq!(pick("zstd;q=0, br;q=0, gzip;q=0"), None);
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("*"), Some(Coding::Zstd));
        assert_eq!(pick("*;q=0.1, br;q=0.2"), Some(Coding::Br));
        assert_eq!(pick("GZIP"), Some(Coding::Gzip));
        assert_eq!(pick("gzip;q=2"), None, "not a q-value");
        assert_eq!(c.negotiate(None), None);
        let gzip_only = route(&["gzip"]);
        assert_eq!(gzip_only.negotiate(Some(b"br, zstd")), None);
    }

    #[test]
    fn only_plain_bodies_of_listed_types_are_compressed() {
        let c = route(&["gzip"]);
        let head = |kind: &'static str| HeadFacts {
            status: 200,
            content_type: Some(kind.as_bytes()),
            ..HeadFacts::default()
        };
        let gz = Some(Coding::Gzip);
        assert_eq!(
            c.decide(&head("text/html; charset=utf-8"), gz),
            Decision::Compress(Coding::Gzip)
        );
        assert_eq!(
            c.decide(&head("application/json"), gz),
            Decision::Compress(Coding::Gzip)
        );
        assert_eq!(c.decide(&head("image/png"), gz), Decision::AsIs);
        assert_eq!(c.decide(&head("text/html"), None), Decision::Vary);
        let mut encoded = head("text/css");
        encoded.content_encoding = Some(b"br");
        assert_eq!(c.decide(&encoded, gz), Decision::Vary);
        let mut range = head("text/css");
        range.status = 206;
        range.content_range = true;
        assert_eq!(c.decide(&range, gz), Decision::Vary);
        let mut small = head("text/css");
        small.content_length = Some(100);
        assert_eq!(c.decide(&small, gz), Decision::Vary);
        let mut fixed = head("text/css");
        fixed.cache_control = Some(b"public, no-transform");
        assert_eq!(c.decide(&fixed, gz), Decision::Vary);
        let mut empty = head("text/css");
        empty.status = 204;
        assert_eq!(c.decide(&empty, gz), Decision::AsIs);
        let svg = Compress::from_config(&["br".into()], Some(&["image/*".into()]), Some(0))
            .expect("valid")
            .expect("on");
        assert_eq!(
            svg.decide(&head("image/svg+xml"), Some(Coding::Br)),
            Decision::Compress(Coding::Br)
        );
        assert_eq!(
            svg.decide(&head("text/html"), Some(Coding::Br)),
            Decision::AsIs
        );
    }

    #[test]
    fn every_encoder_streams_and_round_trips() {
        let body: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{{\"n\":{i}}},").into_bytes())
            .collect();
        for coding in [Coding::Gzip, Coding::Br, Coding::Zstd] {
            let mut encoder = Encoder::new(coding).expect("encoder");
            let mut out = Vec::new();
            let mut drained_early = false;
            for piece in body.chunks(16 * 1024) {
                encoder.write(piece).expect("write");
                let before = out.len();
                encoder.drain_into(&mut out);
                drained_early |= out.len() > before;
            }
            encoder.finish_into(&mut out).expect("finish");
            assert!(drained_early, "{coding:?} held the whole body");
            assert!(
                out.len() < body.len() / 2,
                "{coding:?}: {} bytes",
                out.len()
            );
            let mut back = Vec::new();
            match coding {
                Coding::Gzip => flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut back),
                Coding::Br => brotli::Decompressor::new(&out[..], 4096).read_to_end(&mut back),
                Coding::Zstd => zstd::stream::read::Decoder::new(&out[..])
                    .expect("decoder")
                    .read_to_end(&mut back),
            }
            .expect("decode");
            assert_eq!(back, body, "{coding:?}");
        }
    }

    #[test]
    fn bad_settings_are_refused_naming_the_key() {
        let err = |c: &[&str], t: Option<&[&str]>, m: Option<u64>| {
            let c: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            let t: Option<Vec<String>> = t.map(|t| t.iter().map(|s| s.to_string()).collect());
            Compress::from_config(&c, t.as_deref(), m).expect_err("refused")
        };
        assert!(err(&["deflate"], None, None).contains("compress:"));
        assert!(err(&["gzip", "gzip"], None, None).contains("twice"));
        assert!(err(&["gzip"], Some(&["html"]), None).contains("compress_types"));
        assert!(err(&[], None, Some(10)).contains("need compress"));
        assert_eq!(Compress::from_config(&[], None, None), Ok(None));
    }
}
