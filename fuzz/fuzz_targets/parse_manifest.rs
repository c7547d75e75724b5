//! Any text as a manifest: a release or a list of problems, never a panic.
#![no_main]

use fleet_proto::UnixMillis;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(errors) = fleet_proto::manifest::parse(text, UnixMillis(1_795_773_600_000)) {
        assert!(!errors.0.is_empty());
    }
});
