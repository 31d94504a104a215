//! Fuzz target: arbitrary text into the configuration parser and validator that
//! `modelpool serve`, SIGHUP and `ReloadConfig` run on operator-supplied files. Any
//! input must end in `Ok` or a `ServerError::Config` naming a key: no panic, no overflow.
//!
//! The server crate links no engine (only the worker does), so the parser is the
//! server's own, an ordinary dependency.
//!
//! Seeds (fuzz/seeds/config_toml): the documented example configuration and the three
//! Kubernetes ones.

#![no_main]

use libfuzzer_sys::fuzz_target;

use modelpool_server::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config::Settings::from_toml(text, std::path::Path::new("/nonexistent")) {
        // Every refusal renders (it is what the operator reads).
        let _ = e.to_string();
    }
});
