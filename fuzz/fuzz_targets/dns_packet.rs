//! Any bytes through the DNS answer engine, over UDP and TCP budgets, against a
//! small catalog. Nothing may panic; every answer must be a well-formed header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard_dns::fuzzing::answer_packet(data);
});
