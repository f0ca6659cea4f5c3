//! An endpoint's response through the head parser both HTTP/1.1 clients use
//! and, when chunked, the body decoder of the HTTP/2 side's client: the two
//! readings of the head agree, and the decoder makes progress and ends where
//! the scanner does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard_proxy::fuzzing::response(data);
});
