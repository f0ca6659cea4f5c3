//! Any request through the registry's HTTP API router (method, target and
//! body from the input) against a small in-memory catalog. No panic, no 500
//! beyond Consul's own, no hang, and a refused request changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard_api::fuzzing::api_request(data);
});
