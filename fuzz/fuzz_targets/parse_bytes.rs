//! Fuzz target: arbitrary text into `budget::parse_bytes`, which reads every size in the
//! config file ("6GiB", "512 MiB", "2.5g"). It must answer Ok or Err, never panic, and a
//! size it accepts must read back the same when written out as plain bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use modelpool_pool::budget::{human_bytes, parse_bytes};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(bytes) = parse_bytes(text) else {
        return;
    };
    let _ = human_bytes(bytes);
    // Below 2^53 every integer is exact in an f64, so the plain number round-trips.
    if bytes < 1 << 53 {
        assert_eq!(parse_bytes(&bytes.to_string()), Ok(bytes), "input {text:?}");
    }
});
