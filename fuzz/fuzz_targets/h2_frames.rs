//! A client's HTTP/2 frames through the client-facing codec (frames, HPACK,
//! streams, flow control): no panic, and what it makes of them holds its
//! invariants (see `switchyard_proxy::fuzzing::h2_frames`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard_proxy::fuzzing::h2_frames(data);
});
