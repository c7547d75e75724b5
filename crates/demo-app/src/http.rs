//! Just enough HTTP/1.1 for probes: read one request head (bounded in size and time), parse its
//! request line, write one response with `Connection: close`.
//!
//! Deliberately absent: keep-alive, request bodies, chunked encoding. Probes send one GET per
//! connection; everything else is answered with an error status, never a panic.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// Request line plus headers. Larger heads are answered 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The raw query after `?`, still percent-encoded.
    pub query: Option<String>,
}

/// Why no request head was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// More than `MAX_HEAD_BYTES` without the blank line that ends the head.
    TooLarge,
    /// The deadline passed first (a slow or stuck client).
    TimedOut,
    /// The peer closed or the socket failed: there is nobody to answer.
    Gone,
}

/// Reads until the blank line that ends the head, and returns the head. Bytes after it (a body)
/// are ignored. A per-read timeout alone would let a client that trickles one byte at a time hold
/// the connection indefinitely, hence the overall deadline.
pub fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, ReadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|_| ReadError::Gone)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(ReadError::Gone),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::TimedOut);
            }
            Err(_) => return Err(ReadError::Gone),
        };
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head) {
            if end > MAX_HEAD_BYTES {
                return Err(ReadError::TooLarge);
            }
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(ReadError::TooLarge);
        }
    }
}

/// The length of the head including its terminating blank line, if it is complete. Bare `\n`
/// line ends are accepted too (RFC 9112 §2.2 allows it), which hand-typed `nc` requests use.
fn head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// The head is not a well-formed HTTP/1.x request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Parses the request line and checks that the header lines are well formed. Header values are
/// not needed by any endpoint, so they are not kept.
pub fn parse_head(head: &[u8]) -> Result<Request, Malformed> {
    let text = std::str::from_utf8(head).map_err(|_| Malformed)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(Malformed)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed);
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !method_ok || !target.starts_with('/') || !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(Malformed);
    }
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, _value) = line.split_once(':').ok_or(Malformed)?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(Malformed);
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (target, None),
    };
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
    })
}

/// The first value of `name` in a query string, percent-decoded (`+` is a space, as forms
/// encode it). `Err` when the value's encoding is invalid.
pub fn query_param(query: &str, name: &str) -> Result<Option<Vec<u8>>, Malformed> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return percent_decode(value).map(Some);
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Result<Vec<u8>, Malformed> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) =
                    (hex_digit(bytes.get(i + 1)), hex_digit(bytes.get(i + 2)))
                else {
                    return Err(Malformed);
                };
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn hex_digit(b: Option<&u8>) -> Option<u8> {
    char::from(*b?)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(status: u16, body: String) -> Self {
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }
}

pub fn write_response(w: &mut impl Write, r: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    // One buffer, one write: a probe never sees a head without its body.
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(r.body.as_bytes());
    w.write_all(&bytes)?;
    w.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, query: Option<&str>) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: query.map(Into::into),
        }
    }

    #[test]
    fn parses_heads() {
        #[rustfmt::skip]
        let cases: [(&[u8], Result<Request, Malformed>); 12] = [
            (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", Ok(req("GET", "/health", None))),
            (b"GET /infer?input=a+b HTTP/1.0\r\n\r\n", Ok(req("GET", "/infer", Some("input=a+b")))),
            (b"POST /work HTTP/1.1\nHost: x\n\n", Ok(req("POST", "/work", None))),
            (b"GET / HTTP/1.1\r\nX-Empty:\r\n\r\n", Ok(req("GET", "/", None))),
            (b"garbage\r\n\r\n", Err(Malformed)),
            (b"\r\n\r\n", Err(Malformed)),
            (b"GET  /health HTTP/1.1\r\n\r\n", Err(Malformed)),
            (b"GET health HTTP/1.1\r\n\r\n", Err(Malformed)),
            (b"GET /health HTTP/2\r\n\r\n", Err(Malformed)),
            (b"get /health HTTP/1.1\r\n\r\n", Err(Malformed)),
            (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", Err(Malformed)),
            (b"GET /\xff HTTP/1.1\r\n\r\n", Err(Malformed)),
        ];
        for (head, want) in cases {
            assert_eq!(
                parse_head(head),
                want,
                "head {:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn finds_the_end_of_the_head() {
        let cases: [(&[u8], Option<usize>); 5] = [
            (b"GET / HTTP/1.1\r\n\r\nbody", Some(18)),
            (b"GET / HTTP/1.1\n\nbody", Some(16)),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", None),
            (b"GET / HTTP/1.1\r\n", None),
            (b"", None),
        ];
        for (buf, want) in cases {
            assert_eq!(head_end(buf), want, "{:?}", String::from_utf8_lossy(buf));
        }
    }

    #[test]
    fn decodes_query_params() {
        type Decoded = Result<Option<&'static [u8]>, Malformed>;
        let cases: [(&str, Decoded); 10] = [
            ("input=hello", Ok(Some(b"hello"))),
            ("x=1&input=a%20b+c", Ok(Some(b"a b c"))),
            ("input=", Ok(Some(b""))),
            ("input", Ok(Some(b""))),
            ("input=%C3%BC", Ok(Some("ü".as_bytes()))),
            ("input=%ff", Ok(Some(b"\xff"))),
            ("other=1", Ok(None)),
            ("input=%4", Err(Malformed)),
            ("input=%zz", Err(Malformed)),
            ("input=%+f", Err(Malformed)),
        ];
        for (query, want) in cases {
            let want = want.map(|v| v.map(<[u8]>::to_vec));
            assert_eq!(query_param(query, "input"), want, "query {query:?}");
        }
    }

    #[test]
    fn writes_a_complete_response() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::text(404, "not found\n")).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 10\r\nConnection: close\r\n\r\nnot found\n"
        );
    }
}
