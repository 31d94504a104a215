//! Fuzz target: arbitrary text into the configuration parser and validator that
//! `modelpool serve`, SIGHUP and `ReloadConfig` run on operator-supplied files. Any
//! input must end in `Ok` or a `ConfigError` naming a key: no panic, no overflow.
//!
//! The server crate links mistral.rs, far too heavy to build under the sanitizer, so
//! its `config.rs` is compiled here on its own, next to a stand-in for the two token
//! types it takes from `auth.rs` (same names, same shapes, no gRPC).
//!
//! Seeds (fuzz/seeds/config_toml): the documented example configuration and the three
//! Kubernetes ones.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The shapes `config.rs` needs from the server's `auth` module.
mod auth {
    #[derive(Clone, PartialEq, Eq)]
    pub struct Secret(String);

    impl Secret {
        pub fn new(value: String) -> Self {
            Self(value)
        }
    }

    impl std::fmt::Debug for Secret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Secret(<redacted>)")
        }
    }

    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct AuthSettings {
        pub inference_token: Option<Secret>,
        pub control_token: Option<Secret>,
    }
}

#[allow(dead_code)]
#[path = "../../crates/server/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config::Settings::from_toml(text, std::path::Path::new("/nonexistent")) {
        // Every refusal renders (it is what the operator reads).
        let _ = e.to_string();
    }
});
