//! HPACK (RFC 7541) for the client-facing HTTP/2 side: a decoder whose
//! table entries are already header names and shared values (an indexed
//! field costs two reference-count increments, no parse and no copy), and
//! an encoder that needs no state (static-table names, literal values, no
//! dynamic table: the peer's table size never matters to it). Huffman
//! decoding is `httlib-huffman`'s.

use std::collections::VecDeque;

use bytes::Bytes;
use hyper::header::{self, HeaderName};

/// What a field's name is: one of the request pseudo-headers, a header, or
/// a name HTTP/2 does not allow (uppercase, bad characters, an unknown
/// pseudo-header). Kept in the table either way: the peer's table and ours
/// stay in step even when a request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Name {
    Method,
    Scheme,
    Authority,
    Path,
    Protocol,
    /// Responses' only pseudo-header.
    Status,
    /// Any other pseudo-header: never valid.
    OtherPseudo,
    Header(HeaderName),
    Bad,
}

impl Name {
    fn parse(raw: &[u8]) -> Name {
        match raw {
            b":method" => Name::Method,
            b":scheme" => Name::Scheme,
            b":authority" => Name::Authority,
            b":path" => Name::Path,
            b":protocol" => Name::Protocol,
            b":status" => Name::Status,
            [b':', ..] => Name::OtherPseudo,
            // HTTP/2 field names are lowercase (RFC 9113 §8.2.1);
            // `HeaderName` would fold them silently.
            _ if raw.iter().any(u8::is_ascii_uppercase) => Name::Bad,
            _ => HeaderName::from_bytes(raw).map_or(Name::Bad, Name::Header),
        }
    }

    /// Its length as RFC 7541 §4.1 counts it, for the static table's
    /// names (a literal's is counted from its bytes).
    fn len(&self) -> usize {
        match self {
            Name::Method | Name::Scheme => 7,
            Name::Authority => 10,
            Name::Path => 5,
            Name::Protocol => 9,
            Name::Status => 7,
            Name::Header(name) => name.as_str().len(),
            Name::OtherPseudo | Name::Bad => 0,
        }
    }
}

/// Why a header block cannot be decoded: a connection error
/// (COMPRESSION_ERROR), the peer's table and ours are out of step.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HpackError {
    #[error("header block truncated")]
    Truncated,
    #[error("integer too large")]
    Overflow,
    #[error("index {0} not in the table")]
    Index(usize),
    #[error("invalid Huffman code")]
    Huffman,
    #[error("table size update to {0} above the allowed {1}")]
    TableSize(usize, usize),
    #[error("table size update after a field")]
    LateTableSize,
}

/// The static table (RFC 7541 Appendix A), index 1 first.
fn static_entry(index: usize) -> Option<(Name, Bytes)> {
    use header::*;
    let h = |name: HeaderName| Name::Header(name);
    let (name, value): (Name, &'static [u8]) = match index {
        1 => (Name::Authority, b""),
        2 => (Name::Method, b"GET"),
        3 => (Name::Method, b"POST"),
        4 => (Name::Path, b"/"),
        5 => (Name::Path, b"/index.html"),
        6 => (Name::Scheme, b"http"),
        7 => (Name::Scheme, b"https"),
        8 => (Name::Status, b"200"),
        9 => (Name::Status, b"204"),
        10 => (Name::Status, b"206"),
        11 => (Name::Status, b"304"),
        12 => (Name::Status, b"400"),
        13 => (Name::Status, b"404"),
        14 => (Name::Status, b"500"),
        15 => (h(ACCEPT_CHARSET), b""),
        16 => (h(ACCEPT_ENCODING), b"gzip, deflate"),
        17 => (h(ACCEPT_LANGUAGE), b""),
        18 => (h(ACCEPT_RANGES), b""),
        19 => (h(ACCEPT), b""),
        20 => (h(ACCESS_CONTROL_ALLOW_ORIGIN), b""),
        21 => (h(AGE), b""),
        22 => (h(ALLOW), b""),
        23 => (h(AUTHORIZATION), b""),
        24 => (h(CACHE_CONTROL), b""),
        25 => (h(CONTENT_DISPOSITION), b""),
        26 => (h(CONTENT_ENCODING), b""),
        27 => (h(CONTENT_LANGUAGE), b""),
        28 => (h(CONTENT_LENGTH), b""),
        29 => (h(CONTENT_LOCATION), b""),
        30 => (h(CONTENT_RANGE), b""),
        31 => (h(CONTENT_TYPE), b""),
        32 => (h(COOKIE), b""),
        33 => (h(DATE), b""),
        34 => (h(ETAG), b""),
        35 => (h(EXPECT), b""),
        36 => (h(EXPIRES), b""),
        37 => (h(FROM), b""),
        38 => (h(HOST), b""),
        39 => (h(IF_MATCH), b""),
        40 => (h(IF_MODIFIED_SINCE), b""),
        41 => (h(IF_NONE_MATCH), b""),
        42 => (h(IF_RANGE), b""),
        43 => (h(IF_UNMODIFIED_SINCE), b""),
        44 => (h(LAST_MODIFIED), b""),
        45 => (h(LINK), b""),
        46 => (h(LOCATION), b""),
        47 => (h(MAX_FORWARDS), b""),
        48 => (h(PROXY_AUTHENTICATE), b""),
        49 => (h(PROXY_AUTHORIZATION), b""),
        50 => (h(RANGE), b""),
        51 => (h(REFERER), b""),
        52 => (h(REFRESH), b""),
        53 => (h(RETRY_AFTER), b""),
        54 => (h(SERVER), b""),
        55 => (h(SET_COOKIE), b""),
        56 => (h(STRICT_TRANSPORT_SECURITY), b""),
        57 => (h(TRANSFER_ENCODING), b""),
        58 => (h(USER_AGENT), b""),
        59 => (h(VARY), b""),
        60 => (h(VIA), b""),
        61 => (h(WWW_AUTHENTICATE), b""),
        _ => return None,
    };
    Some((name, Bytes::from_static(value)))
}

const STATIC_LEN: usize = 61;

/// Per-entry overhead RFC 7541 §4.1 adds to a field's size.
const ENTRY_OVERHEAD: usize = 32;

/// A decoder: the connection's dynamic table, as the peer's encoder keeps it.
pub(crate) struct Decoder {
    /// Newest first.
    table: VecDeque<(Name, Bytes, usize)>,
    size: usize,
    /// The size the peer's encoder currently uses.
    max: usize,
    /// The most we allow (our SETTINGS_HEADER_TABLE_SIZE).
    allowed: usize,
    scratch: Vec<u8>,
}

impl Decoder {
    pub(crate) fn new(allowed: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: allowed,
            allowed,
            scratch: Vec::new(),
        }
    }

    /// Decodes one whole header block, handing each field to `field` in
    /// order. An error leaves the table unusable: the connection must end.
    pub(crate) fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(Name, Bytes),
    ) -> Result<(), HpackError> {
        let mut first = true;
        while let Some(&byte) = block.first() {
            if byte & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                let (name, value, _) = self.entry(index)?;
                field(name, value);
            } else if byte & 0xe0 == 0x20 {
                // A dynamic table size update: only before the first field.
                let size = integer(&mut block, 5)?;
                if !first {
                    return Err(HpackError::LateTableSize);
                }
                if size > self.allowed {
                    return Err(HpackError::TableSize(size, self.allowed));
                }
                self.max = size;
                self.evict(0);
                continue;
            } else {
                // Literals: with incremental indexing (6-bit prefix),
                // without or never indexed (4-bit prefix).
                let indexing = byte & 0xc0 == 0x40;
                let index = integer(&mut block, if indexing { 6 } else { 4 })?;
                let name = match index {
                    0 => {
                        let raw = self.string(&mut block)?;
                        let len = raw.len();
                        (Name::parse(&raw), len)
                    }
                    index => {
                        let (name, _, len) = self.entry(index)?;
                        (name, len)
                    }
                };
                let value = self.string(&mut block)?;
                if indexing {
                    self.insert(name.0.clone(), value.clone(), name.1);
                }
                field(name.0, value);
            }
            first = false;
        }
        Ok(())
    }

    /// The entry at `index`: its name, value and the name's length.
    fn entry(&self, index: usize) -> Result<(Name, Bytes, usize), HpackError> {
        if index <= STATIC_LEN {
            let (name, value) = static_entry(index).ok_or(HpackError::Index(index))?;
            let len = name.len();
            return Ok((name, value, len));
        }
        self.table
            .get(index - STATIC_LEN - 1)
            .map(|(name, value, size)| {
                (
                    name.clone(),
                    value.clone(),
                    size - value.len() - ENTRY_OVERHEAD,
                )
            })
            .ok_or(HpackError::Index(index))
    }

    fn insert(&mut self, name: Name, value: Bytes, name_len: usize) {
        let size = name_len + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            // Larger than the table: it empties the table (§4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value, size));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            match self.table.pop_back() {
                Some((_, _, size)) => self.size -= size,
                None => break,
            }
        }
    }

    /// A string literal (§5.2), Huffman-coded or not.
    fn string(&mut self, block: &mut &[u8]) -> Result<Bytes, HpackError> {
        let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = integer(block, 7)?;
        if len > block.len() {
            return Err(HpackError::Truncated);
        }
        let (raw, rest) = block.split_at(len);
        *block = rest;
        if !huffman {
            return Ok(Bytes::copy_from_slice(raw));
        }
        self.scratch.clear();
        httlib_huffman::decode(
            raw,
            &mut self.scratch,
            httlib_huffman::DecoderSpeed::FourBits,
        )
        .map_err(|_| HpackError::Huffman)?;
        Ok(Bytes::copy_from_slice(&self.scratch))
    }
}

/// An integer with an `n`-bit prefix (§5.1); at most 2^28.
fn integer(block: &mut &[u8], n: u8) -> Result<usize, HpackError> {
    let (&first, mut rest) = block.split_first().ok_or(HpackError::Truncated)?;
    let mask = (1usize << n) - 1;
    let mut value = usize::from(first) & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&byte, after) = rest.split_first().ok_or(HpackError::Truncated)?;
            rest = after;
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
            if shift > 21 {
                return Err(HpackError::Overflow);
            }
        }
    }
    *block = rest;
    Ok(value)
}

/// Writes an integer with an `n`-bit prefix, `flags` in the first byte's
/// high bits.
fn put_integer(out: &mut Vec<u8>, flags: u8, n: u8, value: usize) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

fn put_string(out: &mut Vec<u8>, raw: &[u8]) {
    put_integer(out, 0, 7, raw.len());
    out.extend_from_slice(raw);
}

/// Encodes `:status`: an indexed field for the statuses the static table
/// has, else a literal with its name indexed.
pub(crate) fn encode_status(out: &mut Vec<u8>, status: u16) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => 0,
    };
    if index != 0 {
        out.push(0x80 | index);
        return;
    }
    // Literal without indexing, name index 8; a status is three digits.
    out.push(0x08);
    out.push(3);
    let digits = [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    out.extend_from_slice(&digits);
}

/// Encodes a request's pseudo-header as a literal without indexing, its
/// name by static index (1 `:authority`, 2 `:method`, 4 `:path`, 6
/// `:scheme`); the static table's exact entries (GET, POST, /, http,
/// https) as indexed fields.
pub(crate) fn encode_pseudo(out: &mut Vec<u8>, index: u8, value: &[u8]) {
    let exact = match (index, value) {
        (2, b"GET") => 2,
        (2, b"POST") => 3,
        (4, b"/") => 4,
        (6, b"http") => 6,
        (6, b"https") => 7,
        _ => 0,
    };
    if exact != 0 {
        out.push(0x80 | exact);
        return;
    }
    put_integer(out, 0x00, 4, usize::from(index));
    put_string(out, value);
}

/// Encodes one header as a literal without indexing (never indexed for
/// the ones that carry credentials), its name from the static table when
/// it is there.
pub(crate) fn encode_field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8], sensitive: bool) {
    let flags = if sensitive { 0x10 } else { 0x00 };
    match static_name_index(name) {
        Some(index) => put_integer(out, flags, 4, usize::from(index)),
        None => {
            out.push(flags);
            put_string(out, name.as_str().as_bytes());
        }
    }
    put_string(out, value);
}

/// The static table's index of a header name, if it has it.
fn static_name_index(name: &HeaderName) -> Option<u8> {
    Some(match name.as_str() {
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut Decoder, block: &[u8]) -> Vec<(Name, Vec<u8>)> {
        let mut fields = Vec::new();
        decoder
            .decode(block, |name, value| fields.push((name, value.to_vec())))
            .expect("decodes");
        fields
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| {
                u8::from_str_radix(std::str::from_utf8(pair).expect("ascii"), 16).expect("hex")
            })
            .collect()
    }

    fn h(name: &str) -> Name {
        Name::Header(HeaderName::from_bytes(name.as_bytes()).expect("name"))
    }

    /// RFC 7541 C.4: three requests on one connection, Huffman-coded, the
    /// table carried from one to the next.
    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut decoder = Decoder::new(4096);
        let first = decode_all(
            &mut decoder,
            &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
        );
        assert_eq!(
            first,
            vec![
                (Name::Method, b"GET".to_vec()),
                (Name::Scheme, b"http".to_vec()),
                (Name::Path, b"/".to_vec()),
                (Name::Authority, b"www.example.com".to_vec()),
            ]
        );
        assert_eq!(decoder.size, 57);
        let second = decode_all(&mut decoder, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(second[3], (Name::Authority, b"www.example.com".to_vec()));
        assert_eq!(second[4], (h("cache-control"), b"no-cache".to_vec()));
        assert_eq!(decoder.size, 110);
        let third = decode_all(
            &mut decoder,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        );
        assert_eq!(third[1], (Name::Scheme, b"https".to_vec()));
        assert_eq!(third[2], (Name::Path, b"/index.html".to_vec()));
        assert_eq!(third[3], (Name::Authority, b"www.example.com".to_vec()));
        assert_eq!(third[4], (h("custom-key"), b"custom-value".to_vec()));
        assert_eq!(decoder.size, 164);
    }

    /// RFC 7541 C.3: the same requests without Huffman coding.
    #[test]
    fn rfc_7541_c3_requests_without_huffman() {
        let mut decoder = Decoder::new(4096);
        decode_all(
            &mut decoder,
            &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
        );
        decode_all(&mut decoder, &hex("8286 84be 5808 6e6f 2d63 6163 6865"));
        let third = decode_all(
            &mut decoder,
            &hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
        );
        assert_eq!(third[4], (h("custom-key"), b"custom-value".to_vec()));
        // Newest first: custom-key, cache-control, :authority.
        assert_eq!(decoder.table.len(), 3);
        assert_eq!(decoder.table[1].0, h("cache-control"));
    }

    /// RFC 7541 C.5-style eviction: a small table drops its oldest entries.
    #[test]
    fn a_full_table_evicts_its_oldest_entries() {
        let mut decoder = Decoder::new(100);
        // Two literal fields with indexing, 32 + 3 + 30 bytes each: only the
        // newer fits.
        let mut block = Vec::new();
        for name in ["aaa", "bbb"] {
            block.push(0x40);
            put_string(&mut block, name.as_bytes());
            put_string(&mut block, &[b'v'; 30]);
        }
        decode_all(&mut decoder, &block);
        assert_eq!(decoder.table.len(), 1);
        assert_eq!(decoder.table[0].0, h("bbb"));
        // Index 62 is now "bbb"; 63 is gone.
        assert_eq!(decode_all(&mut decoder, &[0x80 | 62])[0].0, h("bbb"));
        assert_eq!(
            decoder.decode(&[0x80 | 63], |_, _| {}),
            Err(HpackError::Index(63))
        );
    }

    #[test]
    fn bad_blocks_are_errors_not_panics() {
        let mut decoder = Decoder::new(4096);
        for block in [
            &[0x80][..],                           // index 0
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // integer too large
            &[0x40, 0x05, b'a'],                   // truncated string
            &[0x00, 0x81, 0xff, 0x01, b'a'],       // Huffman: all ones (EOS)
            &[0x3f, 0xe2, 0x1f],                   // table size 4097, above 4096
            &[0x82, 0x20],                         // size update after a field
        ] {
            assert!(decoder.decode(block, |_, _| {}).is_err(), "{block:x?}");
        }
    }

    #[test]
    fn names_http2_forbids_are_marked_bad() {
        let mut decoder = Decoder::new(4096);
        let mut block = vec![0x00];
        put_string(&mut block, b"X-Upper");
        put_string(&mut block, b"1");
        block.push(0x00);
        put_string(&mut block, b":weird");
        put_string(&mut block, b"1");
        let fields = decode_all(&mut decoder, &block);
        assert_eq!(fields[0].0, Name::Bad);
        assert_eq!(fields[1].0, Name::OtherPseudo);
    }

    /// What the encoder writes, the decoder reads back, integers past their
    /// prefix included.
    #[test]
    fn encoded_responses_decode() {
        let mut out = Vec::new();
        encode_status(&mut out, 200);
        encode_status(&mut out, 503);
        encode_field(&mut out, &header::CONTENT_TYPE, b"application/grpc", false);
        let long = vec![b'x'; 300];
        encode_field(
            &mut out,
            &HeaderName::from_static("grpc-message"),
            &long,
            false,
        );
        encode_field(&mut out, &header::SET_COOKIE, b"a=b", true);
        encode_pseudo(&mut out, 2, b"POST");
        encode_pseudo(&mut out, 2, b"PATCH");
        encode_pseudo(&mut out, 4, b"/echo.Echo/Call");
        encode_pseudo(&mut out, 1, b"api:8080");
        let mut decoder = Decoder::new(4096);
        let fields = decode_all(&mut decoder, &out);
        assert_eq!(fields[0], (Name::Status, b"200".to_vec()));
        assert_eq!(fields[1], (Name::Status, b"503".to_vec()));
        assert_eq!(fields[2], (h("content-type"), b"application/grpc".to_vec()));
        assert_eq!(fields[3], (h("grpc-message"), long));
        assert_eq!(fields[4], (h("set-cookie"), b"a=b".to_vec()));
        assert_eq!(fields[5], (Name::Method, b"POST".to_vec()));
        assert_eq!(fields[6], (Name::Method, b"PATCH".to_vec()));
        assert_eq!(fields[7], (Name::Path, b"/echo.Echo/Call".to_vec()));
        assert_eq!(fields[8], (Name::Authority, b"api:8080".to_vec()));
        assert!(decoder.table.is_empty(), "nothing indexed");
    }
}
