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
pub(crate) const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
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
}
