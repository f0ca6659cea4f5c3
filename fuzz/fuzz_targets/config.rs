//! Any text through the agent's config parser and checks (`src/config.rs`,
//! compiled here on its own): parsed or refused with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Checks read the files a config names (secrets, certificates); device
    // and proc files could block or never end, which is the operator's
    // choice of path, not a parser fault.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    if let Err(reason) = config::AgentConfig::parse(text) {
        assert!(!reason.trim().is_empty(), "a refusal gives its reason");
    }
});
