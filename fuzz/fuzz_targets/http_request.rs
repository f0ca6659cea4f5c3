//! Route lines and a request head through the proxy's route table and strict
//! head parser: the route matches a plain model of the lookup rules, and a
//! forwarded head parses again with the same framing and route.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard_proxy::fuzzing::request_head(data);
});
