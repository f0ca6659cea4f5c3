//! HTTP/2 frames (RFC 9113 §4, §6): the header every frame starts with,
//! and writers that append whole frames to a connection's output buffer.

/// The client's connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) const HEADER_LEN: usize = 9;

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PUSH_PROMISE: u8 = 0x5;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS identifiers (§6.5.2).
pub(crate) const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub(crate) const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub(crate) const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub(crate) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub(crate) const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The frame size every peer accepts until it says otherwise.
pub(crate) const DEFAULT_MAX_FRAME: usize = 16_384;
/// The flow-control window every stream and connection starts with.
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;
/// The largest window (§6.9.1).
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;

/// Error codes (§7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Reason {
    NoError = 0x0,
    ProtocolError = 0x1,
    FlowControlError = 0x3,
    StreamClosed = 0x5,
    FrameSizeError = 0x6,
    RefusedStream = 0x7,
    Cancel = 0x8,
    CompressionError = 0x9,
    EnhanceYourCalm = 0xb,
}

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) len: usize,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
}

impl Head {
    /// Reads a frame header from the first nine bytes of `bytes`.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Head> {
        let b: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }
}

/// Appends a frame header.
pub(crate) fn head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&head_bytes(len, kind, flags, stream));
}

fn head_bytes(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; HEADER_LEN] {
    let len = len as u32;
    let id = (stream & 0x7fff_ffff).to_be_bytes();
    [
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        id[0],
        id[1],
        id[2],
        id[3],
    ]
}

/// Appends a SETTINGS frame with `values`.
pub(crate) fn settings(out: &mut Vec<u8>, values: &[(u16, u32)]) {
    head(out, values.len() * 6, SETTINGS, 0, 0);
    for (id, value) in values {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub(crate) fn settings_ack(out: &mut Vec<u8>) {
    head(out, 0, SETTINGS, ACK, 0);
}

pub(crate) fn window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&(increment & 0x7fff_ffff).to_be_bytes());
}

pub(crate) fn ping(out: &mut Vec<u8>, flags: u8, opaque: [u8; 8]) {
    head(out, 8, PING, flags, 0);
    out.extend_from_slice(&opaque);
}

pub(crate) fn rst_stream(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&(reason as u32).to_be_bytes());
}

pub(crate) fn goaway(out: &mut Vec<u8>, last: u32, reason: Reason) {
    head(out, 8, GOAWAY, 0, 0);
    out.extend_from_slice(&(last & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&(reason as u32).to_be_bytes());
}

/// Appends a DATA frame carrying `data`.
pub(crate) fn data(out: &mut Vec<u8>, stream: u32, data: &[u8], end: bool) {
    head(
        out,
        data.len(),
        DATA,
        if end { END_STREAM } else { 0 },
        stream,
    );
    out.extend_from_slice(data);
}

/// Appends a header block as HEADERS and, past `max_frame`, CONTINUATION
/// frames. The block was encoded at `out[at..]` (after room for one frame
/// header was left at `at`); this writes the frame headers around it.
pub(crate) fn headers_around(
    out: &mut Vec<u8>,
    at: usize,
    stream: u32,
    end: bool,
    max_frame: usize,
) {
    let end_flag = if end { END_STREAM } else { 0 };
    let len = out.len() - at - HEADER_LEN;
    if len <= max_frame {
        // One frame (nearly always): its header goes in the room left.
        out[at..at + HEADER_LEN].copy_from_slice(&head_bytes(
            len,
            HEADERS,
            end_flag | END_HEADERS,
            stream,
        ));
        return;
    }
    let block = out.split_off(at + HEADER_LEN);
    out.truncate(at);
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut kind = HEADERS;
    let mut flags = end_flag;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        head(
            out,
            chunk.len(),
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream,
        );
        out.extend_from_slice(chunk);
        kind = CONTINUATION;
        flags = 0;
    }
}

/// A DATA or HEADERS payload without its padding (RFC 9113 §6.1).
pub(crate) fn unpad(head: Head, payload: &[u8]) -> Result<&[u8], Reason> {
    if head.flags & PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload.split_first().ok_or(Reason::FrameSizeError)?;
    let pad = usize::from(pad);
    if pad > rest.len() {
        return Err(Reason::ProtocolError);
    }
    Ok(&rest[..rest.len() - pad])
}

/// Fields HTTP/2 forbids (connection-specific, RFC 9113 §8.2.2; `te` is
/// judged by its value).
pub(crate) fn connection_specific(name: &hyper::header::HeaderName) -> bool {
    use hyper::header::{CONNECTION, TRANSFER_ENCODING, UPGRADE};
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Reserves room for a frame header at the end of `out`, for
/// `headers_around`; returns where it starts.
pub(crate) fn reserve_head(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    at
}

/// What a connection has read and not yet handled: reads go in at the
/// back, whole frames are taken from the front.
#[derive(Default)]
pub(crate) struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    pub(crate) fn new(size: usize) -> Input {
        Input {
            buf: vec![0; size],
            start: 0,
            end: 0,
        }
    }

    /// Room for the next read (what is left moves to the front when the
    /// buffer's end is reached; a frame never exceeds it).
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into `space()`.
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// The bytes read and not yet handled.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Hands every whole frame to `each` in order, up to the first error
    /// (a frame above the default maximum size is FRAME_SIZE_ERROR).
    pub(crate) fn frames(
        &mut self,
        mut each: impl FnMut(Head, &[u8]) -> Result<(), Reason>,
    ) -> Result<(), Reason> {
        while let Some(head) = Head::parse(self.pending()) {
            if head.len > DEFAULT_MAX_FRAME {
                return Err(Reason::FrameSizeError);
            }
            let len = HEADER_LEN + head.len;
            if len > self.end - self.start {
                break;
            }
            let at = self.start + HEADER_LEN;
            self.consume(len);
            each(head, &self.buf[at..at + head.len])?;
        }
        Ok(())
    }
}

/// A whole header block: its stream, the HEADERS frame's flags, its bytes.
pub(crate) type Block<'p> = (u32, u8, std::borrow::Cow<'p, [u8]>);

/// A header block being read: HEADERS, then CONTINUATION frames until
/// END_HEADERS (RFC 9113 §6.10); nothing else may come in between.
#[derive(Default)]
pub(crate) struct Blocks {
    partial: Option<(u32, u8, Vec<u8>)>,
}

impl Blocks {
    /// Whether a block is open: only its CONTINUATION may come next.
    pub(crate) fn open(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes a HEADERS or CONTINUATION frame; at END_HEADERS, the whole
    /// block: its stream, the HEADERS frame's flags and its bytes. A block
    /// above `max` bytes is ENHANCE_YOUR_CALM.
    pub(crate) fn take<'p>(
        &mut self,
        head: Head,
        payload: &'p [u8],
        max: usize,
    ) -> Result<Option<Block<'p>>, Reason> {
        let (id, flags, block) = if head.kind == HEADERS {
            let mut block = unpad(head, payload)?;
            if head.flags & PRIORITY_FLAG != 0 {
                block = block.get(5..).ok_or(Reason::FrameSizeError)?;
            }
            if head.flags & END_HEADERS != 0 {
                return Ok(Some((head.stream, head.flags, block.into())));
            }
            (head.stream, head.flags, block.to_vec())
        } else {
            let Some((id, flags, mut block)) = self.partial.take() else {
                return Err(Reason::ProtocolError);
            };
            if id != head.stream {
                return Err(Reason::ProtocolError);
            }
            block.extend_from_slice(payload);
            if block.len() > max {
                return Err(Reason::EnhanceYourCalm);
            }
            if head.flags & END_HEADERS != 0 {
                return Ok(Some((id, flags, block.into())));
            }
            (id, flags, block)
        };
        self.partial = Some((id, flags, block));
        Ok(None)
    }
}

/// The values of a SETTINGS frame a sender acts on, checked (RFC 9113
/// §6.5.2); the last of each wins.
#[derive(Default)]
pub(crate) struct Settings {
    pub(crate) initial_window: Option<i64>,
    pub(crate) max_frame: Option<usize>,
    pub(crate) max_streams: Option<u32>,
}

impl Settings {
    /// A SETTINGS frame's values; `None` for an acknowledgment.
    pub(crate) fn read(head: Head, payload: &[u8]) -> Result<Option<Settings>, Reason> {
        if head.stream != 0 {
            return Err(Reason::ProtocolError);
        }
        if head.flags & ACK != 0 {
            return match payload.is_empty() {
                true => Ok(None),
                false => Err(Reason::FrameSizeError),
            };
        }
        if !payload.len().is_multiple_of(6) {
            return Err(Reason::FrameSizeError);
        }
        let mut settings = Settings::default();
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                SETTINGS_ENABLE_PUSH if value > 1 => return Err(Reason::ProtocolError),
                SETTINGS_INITIAL_WINDOW_SIZE if i64::from(value) > MAX_WINDOW => {
                    return Err(Reason::FlowControlError)
                }
                SETTINGS_INITIAL_WINDOW_SIZE => settings.initial_window = Some(i64::from(value)),
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME as u32..=(1 << 24) - 1).contains(&value) {
                        return Err(Reason::ProtocolError);
                    }
                    settings.max_frame = Some(value as usize);
                }
                SETTINGS_MAX_CONCURRENT_STREAMS => settings.max_streams = Some(value),
                // The header table size does not matter to an encoder that
                // keeps no table; the header list size is advisory.
                _ => {}
            }
        }
        Ok(Some(settings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back() {
        let mut out = Vec::new();
        head(&mut out, 0x12345, HEADERS, END_HEADERS, 7);
        assert_eq!(
            Head::parse(&out),
            Some(Head {
                len: 0x12345,
                kind: HEADERS,
                flags: END_HEADERS,
                stream: 7
            })
        );
        assert_eq!(Head::parse(&out[..8]), None);
    }

    #[test]
    fn a_large_block_continues_in_continuation_frames() {
        let mut out = b"xx".to_vec();
        let at = reserve_head(&mut out);
        out.extend_from_slice(&[7u8; 25]);
        headers_around(&mut out, at, 3, true, 10);
        let first = Head::parse(&out[2..]).expect("head");
        assert_eq!(
            (first.len, first.kind, first.flags),
            (10, HEADERS, END_STREAM)
        );
        let second = Head::parse(&out[2 + 9 + 10..]).expect("head");
        assert_eq!(
            (second.len, second.kind, second.flags),
            (10, CONTINUATION, 0)
        );
        let third = Head::parse(&out[2 + 2 * 19..]).expect("head");
        assert_eq!(
            (third.len, third.kind, third.flags),
            (5, CONTINUATION, END_HEADERS)
        );
        assert_eq!(out.len(), 2 + 3 * 9 + 25);
    }

    /// Frames cut across reads come out whole and in order; a block over
    /// HEADERS and CONTINUATION comes out once, joined.
    #[test]
    fn input_and_blocks_join_what_reads_and_frames_cut() {
        let mut wire = Vec::new();
        head(&mut wire, 3, HEADERS, 0, 1);
        wire.extend_from_slice(b"abc");
        head(&mut wire, 2, CONTINUATION, END_HEADERS, 1);
        wire.extend_from_slice(b"de");
        ping(&mut wire, 0, *b"12345678");
        for cut in [1, 4, 9, 13, wire.len()] {
            let mut input = Input::new(64);
            let mut blocks = Blocks::default();
            let mut seen = Vec::new();
            for piece in wire.chunks(cut) {
                input.space()[..piece.len()].copy_from_slice(piece);
                input.filled(piece.len());
                input
                    .frames(|head, payload| {
                        if head.kind == PING {
                            seen.push(payload.to_vec());
                        } else if let Some((id, _, block)) = blocks.take(head, payload, 100)? {
                            assert_eq!(id, 1);
                            seen.push(block.to_vec());
                        }
                        Ok(())
                    })
                    .expect("frames");
            }
            assert_eq!(
                seen,
                vec![b"abcde".to_vec(), b"12345678".to_vec()],
                "cut {cut}"
            );
        }
        // CONTINUATION without HEADERS, or on another stream; a block too large.
        let mut blocks = Blocks::default();
        let continuation = Head {
            len: 1,
            kind: CONTINUATION,
            flags: END_HEADERS,
            stream: 1,
        };
        assert_eq!(
            blocks.take(continuation, b"x", 100),
            Err(Reason::ProtocolError)
        );
        let headers = Head {
            len: 1,
            kind: HEADERS,
            flags: 0,
            stream: 3,
        };
        assert_eq!(blocks.take(headers, b"x", 100), Ok(None));
        assert!(blocks.open());
        assert_eq!(
            blocks.take(continuation, b"x", 100),
            Err(Reason::ProtocolError)
        );
        assert_eq!(blocks.take(headers, b"x", 100), Ok(None));
        let long = Head {
            len: 200,
            kind: CONTINUATION,
            flags: 0,
            stream: 3,
        };
        assert_eq!(
            blocks.take(long, &[0; 200], 100),
            Err(Reason::EnhanceYourCalm)
        );
    }

    #[test]
    fn settings_are_read_and_checked() {
        let frame = |values: &[(u16, u32)]| {
            let mut out = Vec::new();
            settings(&mut out, values);
            out
        };
        let read = |wire: &[u8]| {
            let head = Head::parse(wire).expect("head");
            Settings::read(head, &wire[HEADER_LEN..])
        };
        let ok = read(&frame(&[
            (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
            (SETTINGS_MAX_FRAME_SIZE, 1 << 15),
        ]))
        .expect("valid")
        .expect("not an ACK");
        assert_eq!(
            (ok.initial_window, ok.max_frame, ok.max_streams),
            (Some(1 << 20), Some(1 << 15), None)
        );
        assert_eq!(
            read(&frame(&[(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31)])).err(),
            Some(Reason::FlowControlError)
        );
        assert_eq!(
            read(&frame(&[(SETTINGS_MAX_FRAME_SIZE, 100)])).err(),
            Some(Reason::ProtocolError)
        );
        assert_eq!(
            read(&frame(&[(SETTINGS_ENABLE_PUSH, 2)])).err(),
            Some(Reason::ProtocolError)
        );
        let mut ack = Vec::new();
        settings_ack(&mut ack);
        assert!(matches!(read(&ack), Ok(None)));
    }
}
