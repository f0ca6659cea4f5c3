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

/// gzip's header: deflate, no name or time, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Finished gzip and zstd states each thread keeps for the next responses:
/// a context made per response cost more than compressing 64 KiB (its
/// tables allocated, faulted in and cleared each time; see bench/RESULTS.md).
const SPARE_PER_THREAD: usize = 16;

#[derive(Default)]
struct Spare {
    gzip: Vec<flate2::Compress>,
    zstd: Vec<zstd::stream::raw::Encoder<'static>>,
}

thread_local! {
    static SPARE: std::cell::RefCell<Spare> = std::cell::RefCell::new(Spare::default());
}

/// A streaming encoder writing into a buffer the caller drains.
pub(crate) struct Encoder {
    kind: Kind,
    /// Compressed bytes not yet drained.
    out: Vec<u8>,
    /// Bytes taken in since it last gave some out.
    held: usize,
}

enum Kind {
    Gzip {
        deflate: flate2::Compress,
        crc: flate2::Crc,
    },
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::raw::Encoder<'static>),
}

fn broken(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(what.to_string())
}

impl Encoder {
    pub(crate) fn new(coding: Coding) -> std::io::Result<Encoder> {
        let spare = |take: fn(&mut Spare) -> Option<Kind>| {
            SPARE.with(|s| s.try_borrow_mut().ok().and_then(|mut s| take(&mut s)))
        };
        let mut out = Vec::new();
        let kind = match coding {
            Coding::Gzip => {
                out.extend_from_slice(&GZIP_HEADER);
                match spare(|s| {
                    s.gzip.pop().map(|deflate| Kind::Gzip {
                        deflate,
                        crc: flate2::Crc::new(),
                    })
                }) {
                    Some(kind) => kind,
                    None => Kind::Gzip {
                        deflate: flate2::Compress::new(flate2::Compression::new(1), false),
                        crc: flate2::Crc::new(),
                    },
                }
            }
            Coding::Br => Kind::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                4,
                WINDOW_LOG,
            ))),
            Coding::Zstd => match spare(|s| s.zstd.pop().map(Kind::Zstd)) {
                Some(kind) => kind,
                None => {
                    let mut cctx = zstd::stream::raw::Encoder::new(3)?;
                    cctx.set_parameter(zstd::stream::raw::CParameter::WindowLog(WINDOW_LOG))?;
                    Kind::Zstd(cctx)
                }
            },
        };
        Ok(Encoder { kind, out, held: 0 })
    }

    /// Feeds body bytes in. An encoder that has taken `HOLD_AT_MOST`
    /// without giving anything out is flushed, so a response streams.
    pub(crate) fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let before = self.out.len() + self.br_made();
        match &mut self.kind {
            Kind::Gzip { deflate, crc } => {
                crc.update(data);
                deflate_into(deflate, data, &mut self.out, flate2::FlushCompress::None)?;
            }
            Kind::Br(e) => e.write_all(data)?,
            Kind::Zstd(cctx) => zstd_into(cctx, data, &mut self.out)?,
        }
        self.held += data.len();
        if self.out.len() + self.br_made() > before {
            self.held = 0;
        } else if self.held >= HOLD_AT_MOST {
            match &mut self.kind {
                Kind::Gzip { deflate, .. } => {
                    deflate_into(deflate, &[], &mut self.out, flate2::FlushCompress::Sync)?
                }
                Kind::Br(e) => e.flush()?,
                Kind::Zstd(cctx) => zstd_end(cctx, &mut self.out, false)?,
            }
            self.held = 0;
        }
        Ok(())
    }

    /// What brotli's writer holds for us (it writes into a buffer of its own).
    fn br_made(&mut self) -> usize {
        match &mut self.kind {
            Kind::Br(e) => e.get_mut().len(),
            _ => 0,
        }
    }

    /// The compressed bytes made so far, moved into `out` (appended).
    pub(crate) fn drain_into(&mut self, out: &mut Vec<u8>) {
        if let Kind::Br(e) = &mut self.kind {
            self.out.append(e.get_mut());
        }
        out.append(&mut self.out);
    }

    /// Ends the stream; the last compressed bytes appended to `out`. The
    /// gzip and zstd states go back to this thread's spares.
    pub(crate) fn finish_into(mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        match self.kind {
            Kind::Gzip { mut deflate, crc } => {
                deflate_into(
                    &mut deflate,
                    &[],
                    &mut self.out,
                    flate2::FlushCompress::Finish,
                )?;
                self.out.extend_from_slice(&crc.sum().to_le_bytes());
                self.out.extend_from_slice(&crc.amount().to_le_bytes());
                deflate.reset();
                SPARE.with(|s| {
                    if let Ok(mut s) = s.try_borrow_mut() {
                        if s.gzip.len() < SPARE_PER_THREAD {
                            s.gzip.push(deflate);
                        }
                    }
                });
            }
            Kind::Br(e) => self.out.append(&mut e.into_inner()),
            Kind::Zstd(mut cctx) => {
                zstd_end(&mut cctx, &mut self.out, true)?;
                use zstd::stream::raw::Operation;
                if cctx.reinit().is_ok() {
                    SPARE.with(|s| {
                        if let Ok(mut s) = s.try_borrow_mut() {
                            if s.zstd.len() < SPARE_PER_THREAD {
                                s.zstd.push(cctx);
                            }
                        }
                    });
                }
            }
        }
        out.append(&mut self.out);
        Ok(())
    }
}

/// Runs `input` through `deflate` into `out`'s spare room (grown as needed)
/// with `flush`: returns when the input is taken and, for a flush, when the
/// output is complete.
fn deflate_into(
    deflate: &mut flate2::Compress,
    mut input: &[u8],
    out: &mut Vec<u8>,
    flush: flate2::FlushCompress,
) -> std::io::Result<()> {
    loop {
        out.reserve(input.len() / 2 + 4096);
        let (taken, made) = (deflate.total_in(), deflate.total_out());
        let status = deflate.compress_vec(input, out, flush).map_err(broken)?;
        let taken = usize::try_from(deflate.total_in() - taken).map_err(broken)?;
        let made = deflate.total_out() - made;
        input = &input[taken.min(input.len())..];
        let room_left = out.len() < out.capacity();
        let done = match flush {
            flate2::FlushCompress::Finish => status == flate2::Status::StreamEnd,
            flate2::FlushCompress::None => input.is_empty(),
            _ => input.is_empty() && room_left,
        };
        if done {
            return Ok(());
        }
        if taken == 0 && made == 0 && room_left {
            return Err(broken("deflate made no progress"));
        }
    }
}

/// Runs `input` through zstd into `out` (grown as needed).
fn zstd_into(
    cctx: &mut zstd::stream::raw::Encoder<'static>,
    input: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut input = InBuffer::around(input);
    while input.pos() < input.src.len() {
        out.reserve(input.src.len() / 2 + 4096);
        let at = out.len();
        cctx.run(&mut input, &mut OutBuffer::around_pos(out, at))?;
    }
    Ok(())
}

/// Flushes zstd's block (`end` false) or ends its frame, into `out`.
fn zstd_end(
    cctx: &mut zstd::stream::raw::Encoder<'static>,
    out: &mut Vec<u8>,
    end: bool,
) -> std::io::Result<()> {
    use zstd::stream::raw::{Operation, OutBuffer};
    loop {
        out.reserve(4096);
        let at = out.len();
        let mut output = OutBuffer::around_pos(out, at);
        let left = match end {
            true => cctx.finish(&mut output, true)?,
            false => cctx.flush(&mut output)?,
        };
        if left == 0 {
            return Ok(());
        }
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
        // Each twice: the second gzip and zstd encoders are the first's
        // states, reset.
        let codings = [Coding::Gzip, Coding::Br, Coding::Zstd];
        for coding in codings.into_iter().chain(codings) {
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
        SPARE.with(|s| {
            let s = s.borrow();
            assert_eq!(
                (s.gzip.len(), s.zstd.len()),
                (1, 1),
                "kept, and taken again"
            );
        });
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
