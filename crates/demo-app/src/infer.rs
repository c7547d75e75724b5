//! The functional endpoint: a deterministic stand-in for a model. The same input gives the same
//! bytes in every run and every version, so a functional probe can pin an expected digest;
//! `--wrong-output` simulates a release whose model answers differently.
//!
//! Architecture invariant: the mapping below is a contract with recorded probe digests. Changing
//! it breaks every manifest that pinned an output; the golden test guards it.

use std::thread;

use crate::faults::FaultKnobs;

const LABELS: [&str; 8] = [
    "person",
    "car",
    "bicycle",
    "dog",
    "cat",
    "bird",
    "truck",
    "background",
];

/// Answers one inference as the app is configured: with the `--latency-ms` knob (so a probe's
/// latency bound can catch a slow release) and the `--wrong-output` knob.
pub fn answer(input: &[u8], faults: &FaultKnobs) -> String {
    thread::sleep(faults.latency);
    infer(input, faults.wrong_output)
}

/// `label=<one of LABELS> score=<0.000..0.999>` and a newline, from the FNV-1a hash of `input`.
fn infer(input: &[u8], wrong_output: bool) -> String {
    let hash = fnv1a64(input);
    let mut label = (hash % LABELS.len() as u64) as usize;
    if wrong_output {
        // The next label: always different from the right answer, whatever the input.
        label = (label + 1) % LABELS.len();
    }
    let score = (hash >> 32) % 1000;
    format!("label={} score=0.{score:03}\n", LABELS[label])
}

/// FNV-1a, 64 bit: a fixed, documented function, unlike std's `DefaultHasher`, whose output may
/// change between Rust releases.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xAF63_DC4C_8601_EC8C);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_F739_67E8);
    }

    /// Golden outputs: these bytes are what probes pin. Do not update them to make a change pass.
    #[test]
    fn outputs_are_pinned() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "label=bird score=0.724\n"),
            (b"hello", "label=dog score=0.518\n"),
            (b"frame-0001", "label=truck score=0.710\n"),
            ("ünïcödé".as_bytes(), "label=bicycle score=0.836\n"),
        ];
        for (input, want) in cases {
            assert_eq!(infer(input, false), want, "input {input:?}");
        }
    }

    #[test]
    fn wrong_output_always_differs() {
        for i in 0..1000u32 {
            let input = i.to_string();
            assert_ne!(
                infer(input.as_bytes(), false),
                infer(input.as_bytes(), true)
            );
        }
    }
}
