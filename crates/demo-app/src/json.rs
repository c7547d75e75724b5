//! A minimal JSON object writer: enough for `/health`, without pulling serde into a binary that
//! should stay small.

use std::fmt::Write as _;

/// A JSON object built one member at a time. Keys are written in the order they are added.
#[derive(Debug)]
pub struct Object {
    buf: String,
}

impl Object {
    pub fn new() -> Self {
        Object {
            buf: String::from("{"),
        }
    }

    pub fn string(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        escape_into(value, &mut self.buf);
        self
    }

    /// A number with a fixed count of decimals; NaN and infinities, which JSON cannot express,
    /// become `null`.
    pub fn number(mut self, key: &str, value: f64, decimals: usize) -> Self {
        self.key(key);
        if value.is_finite() {
            // Writing to a String cannot fail.
            let _ = write!(self.buf, "{value:.decimals$}");
        } else {
            self.buf.push_str("null");
        }
        self
    }

    pub fn integer(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        let _ = write!(self.buf, "{value}");
        self
    }

    /// An integer that may be unknown (`null`).
    pub fn optional_integer(mut self, key: &str, value: Option<u64>) -> Self {
        self.key(key);
        match value {
            Some(v) => {
                let _ = write!(self.buf, "{v}");
            }
            None => self.buf.push_str("null"),
        }
        self
    }

    pub fn object(mut self, key: &str, value: Object) -> Self {
        self.key(key);
        self.buf.push_str(&value.finish());
        self
    }

    pub fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }

    fn key(&mut self, key: &str) {
        if self.buf.len() > 1 {
            self.buf.push(',');
        }
        escape_into(key, &mut self.buf);
        self.buf.push(':');
    }
}

/// Writes `s` as a quoted JSON string. Versions and check names come from the command line, so
/// quotes, backslashes and control characters must not break the document.
fn escape_into(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        let cases = [
            ("plain", r#""plain""#),
            ("a\"b", r#""a\"b""#),
            ("back\\slash", r#""back\\slash""#),
            ("line\nbreak\ttab\r", r#""line\nbreak\ttab\r""#),
            ("\u{1}bell\u{7}", r#""\u0001bell\u0007""#),
            ("ünïcödé", r#""ünïcödé""#),
        ];
        for (input, want) in cases {
            let mut got = String::new();
            escape_into(input, &mut got);
            assert_eq!(got, want, "input {input:?}");
        }
    }

    #[test]
    fn builds_nested_objects_in_order() {
        let inner = Object::new().string("worker", "ok");
        let json = Object::new()
            .string("status", "healthy")
            .object("checks", inner)
            .number("error_rate", 0.25, 4)
            .number("p95_ms", f64::NAN, 3)
            .integer("requests", 42)
            .optional_integer("rss_bytes", None)
            .finish();
        assert_eq!(
            json,
            r#"{"status":"healthy","checks":{"worker":"ok"},"error_rate":0.2500,"p95_ms":null,"requests":42,"rss_bytes":null}"#
        );
    }

    #[test]
    fn empty_object() {
        assert_eq!(Object::new().finish(), "{}");
    }
}
