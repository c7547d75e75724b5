//! A small Docker Engine API client over the engine's unix socket: the calls the `container`
//! runtime makes (load, inspect, tag, create, start, stop, remove), nothing else.
//!
//! Design: hand-written HTTP/1.1 (one request per connection, `Connection: close`, chunked or
//! sized responses) instead of a client crate, for the same reason the agent's health probes
//! are hand-written: the agent's size on small devices. Paths are pinned to API version 1.41
//! (Docker 20.10); later engines and podman's Docker-compatible service accept it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

const API: &str = "/v1.41";

/// What went wrong talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the container engine at {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("container engine: {method} {path}: {source}")]
    Io {
        method: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("container engine: {method} {path} answered {status}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("container engine: {method} {path} did not answer within {}s", timeout.as_secs())]
    Timeout {
        method: &'static str,
        path: String,
        timeout: Duration,
    },
    #[error("container engine: {0}")]
    Other(String),
}

impl DockerError {
    /// The engine answered 404: no such container or image.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DockerError::Status { status: 404, .. })
    }
}

/// `unix:///PATH` (or a bare absolute path) → the socket's path.
pub fn socket_path(host: &str) -> Option<PathBuf> {
    let path = host.strip_prefix("unix://").unwrap_or(host);
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// The engine at one socket.
#[derive(Clone, Debug)]
pub struct Docker {
    socket: PathBuf,
    /// Bound on every call except image loads (and stops, which add their grace period).
    timeout: Duration,
}

/// A response: status and body (de-chunked).
struct Response {
    status: u16,
    body: Vec<u8>,
}

enum Body<'a> {
    None,
    Json(Vec<u8>),
    File(&'a Path),
}

impl Docker {
    pub fn new(socket: PathBuf) -> Docker {
        Docker {
            socket,
            timeout: Duration::from_secs(30),
        }
    }

    async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Body<'_>,
        timeout: Duration,
    ) -> Result<Response, DockerError> {
        let full = format!("{API}{path}");
        match tokio::time::timeout(timeout, self.exchange(method, &full, body)).await {
            Ok(r) => r,
            Err(_) => Err(DockerError::Timeout {
                method,
                path: full,
                timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: &'static str,
        path: &str,
        body: Body<'_>,
    ) -> Result<Response, DockerError> {
        let io = |source| DockerError::Io {
            method,
            path: path.to_owned(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| DockerError::Connect {
                    socket: self.socket.display().to_string(),
                    source,
                })?;
        let (content_type, length) = match &body {
            Body::None => (None, 0),
            Body::Json(b) => (Some("application/json"), b.len() as u64),
            Body::File(p) => (
                Some("application/x-tar"),
                std::fs::metadata(p).map_err(io)?.len(),
            ),
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: fleet-agent\r\nConnection: close\r\nContent-Length: {length}\r\n"
        );
        if let Some(t) = content_type {
            head.push_str(&format!("Content-Type: {t}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        match body {
            Body::None => {}
            Body::Json(b) => stream.write_all(&b).await.map_err(io)?,
            Body::File(p) => {
                // Design: plain file reads; image loads run on the install's blocking thread.
                use std::io::Read as _;
                let mut f = std::fs::File::open(p).map_err(io)?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut buf).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    stream.write_all(&buf[..n]).await.map_err(io)?;
                }
            }
        }
        stream.flush().await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        parse_response(&raw).map_err(|e| DockerError::Other(format!("{method} {path}: {e}")))
    }

    /// Calls and fails on a status outside 2xx (304 "already so" counts as success).
    async fn ok(
        &self,
        method: &'static str,
        path: &str,
        body: Body<'_>,
        timeout: Duration,
    ) -> Result<Vec<u8>, DockerError> {
        let r = self.call(method, path, body, timeout).await?;
        if (200..300).contains(&r.status) || r.status == 304 {
            Ok(r.body)
        } else {
            Err(DockerError::Status {
                method,
                path: format!("{API}{path}"),
                status: r.status,
                message: message(&r.body),
            })
        }
    }

    async fn json(&self, path: &str) -> Result<Value, DockerError> {
        let body = self.ok("GET", path, Body::None, self.timeout).await?;
        serde_json::from_slice(&body).map_err(|e| DockerError::Other(format!("GET {path}: {e}")))
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        self.ok("GET", "/_ping", Body::None, self.timeout)
            .await
            .map(|_| ())
    }

    /// `docker load` of a `docker save` tarball. The engine streams progress as JSON lines;
    /// a line with `error` is a failed load even though the status was 200.
    pub async fn load(&self, tarball: &Path, timeout: Duration) -> Result<(), DockerError> {
        let body = self
            .ok("POST", "/images/load?quiet=1", Body::File(tarball), timeout)
            .await?;
        for line in body.split(|b| *b == b'\n') {
            if let Ok(v) = serde_json::from_slice::<Value>(line)
                && let Some(e) = v.get("error").and_then(Value::as_str)
            {
                return Err(DockerError::Other(format!(
                    "loading {}: {e}",
                    tarball.display()
                )));
            }
        }
        Ok(())
    }

    /// The id (`sha256:…`) of an image, by reference or id.
    pub async fn image_id(&self, image: &str) -> Result<String, DockerError> {
        let v = self.json(&format!("/images/{image}/json")).await?;
        v.get("Id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| DockerError::Other(format!("image {image} has no Id")))
    }

    /// Tags `image` as `repo:tag` (moving the tag if it exists).
    pub async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), DockerError> {
        self.ok(
            "POST",
            &format!("/images/{image}/tag?repo={repo}&tag={tag}"),
            Body::None,
            self.timeout,
        )
        .await
        .map(|_| ())
    }

    pub async fn inspect_container(&self, name: &str) -> Result<Value, DockerError> {
        self.json(&format!("/containers/{name}/json")).await
    }

    /// Creates a container named `name` from an Engine API create body.
    pub async fn create(&self, name: &str, body: &Value) -> Result<String, DockerError> {
        let bytes = serde_json::to_vec(body).expect("a JSON value serialises");
        let out = self
            .ok(
                "POST",
                &format!("/containers/create?name={name}"),
                Body::Json(bytes),
                self.timeout,
            )
            .await?;
        let v: Value = serde_json::from_slice(&out)
            .map_err(|e| DockerError::Other(format!("create {name}: {e}")))?;
        Ok(v.get("Id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        self.ok(
            "POST",
            &format!("/containers/{id}/start"),
            Body::None,
            self.timeout,
        )
        .await
        .map(|_| ())
    }

    /// Stops (SIGTERM, SIGKILL after `grace`) and removes a container; absent is fine.
    pub async fn stop_and_remove(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        let secs = grace.as_secs().max(1);
        match self
            .ok(
                "POST",
                &format!("/containers/{name}/stop?t={secs}"),
                Body::None,
                self.timeout + grace,
            )
            .await
        {
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => tracing::warn!("{e}; removing it by force"),
            Ok(_) => {}
        }
        match self
            .ok(
                "DELETE",
                &format!("/containers/{name}?force=1"),
                Body::None,
                self.timeout,
            )
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// The engine's error message: `{"message": …}`, or the body as text.
fn message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// Parses a complete HTTP/1.1 response read until the connection closed.
fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete response header")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response header is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            Some(n) => return Err(format!("body cut short ({} of {n} bytes)", rest.len())),
            None => rest.to_vec(),
        }
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body cut short")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sized_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"message\":\"No such image\"}\n\n").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(message(&r.body), "No such image");
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello world"[..]));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
                .is_err()
        );
        assert!(parse_response(b"garbage").is_err());
        assert_eq!(
            socket_path("unix:///run/docker.sock"),
            Some(PathBuf::from("/run/docker.sock"))
        );
        assert_eq!(socket_path("tcp://1.2.3.4:2375"), None);
    }
}
