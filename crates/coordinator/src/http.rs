//! The one HTTP listener: `/metrics`, read-only JSON under `/api/v1/`, and `/artifacts/{sha256}`
//! serving a content-addressed directory with Range support (a gateway can be its devices'
//! artifact cache).

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fleet_proto::operator::AuditQuery;
use fleet_proto::{DeviceId, RolloutId, UnixMillis};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::metrics::Metrics;
use crate::registry::Store;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub database: PathBuf,
    pub artifacts: PathBuf,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/rollouts", get(rollouts))
        .route("/api/v1/audit", get(audit))
        .route("/artifacts/:sha256", get(artifact))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], msg + "\n").into_response()
}

async fn with_store<T: Send + 'static>(
    s: &HttpState,
    f: impl FnOnce(&Store) -> Result<T, crate::registry::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let path = s.database.clone();
    tokio::task::spawn_blocking(move || {
        let store = Store::open_reader(&path)?;
        f(&store)
    })
    .await
    .map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("registry query: {e}"),
        )
    })?
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn devices(State(s): State<HttpState>) -> Response {
    match with_store(&s, |st| st.load_devices()).await {
        Ok(rows) => {
            let views: Vec<_> = rows.iter().map(crate::driver::device_view).collect();
            axum::Json(views).into_response()
        }
        Err(r) => r,
    }
}

async fn rollouts(State(s): State<HttpState>) -> Response {
    let list = s
        .metrics
        .gauges
        .lock()
        .map(|g| g.rollouts.clone())
        .unwrap_or_default();
    axum::Json(list).into_response()
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    device: Option<String>,
    rollout: Option<String>,
    since: Option<u64>,
    limit: Option<u32>,
}

async fn audit(State(s): State<HttpState>, Query(p): Query<AuditParams>) -> Response {
    let device = match p.device.map(DeviceId::new).transpose() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let rollout = match p.rollout.map(RolloutId::new).transpose() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let q = AuditQuery {
        device,
        rollout,
        since: p.since.map(UnixMillis),
        limit: p.limit,
    };
    match with_store(&s, move |st| st.audit(&q)).await {
        Ok(rows) => axum::Json(rows).into_response(),
        Err(r) => r,
    }
}

/// A parsed `Range: bytes=…` header (one range only).
#[derive(Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b` (inclusive) or `a-`.
    From { start: u64, end: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

pub fn parse_range(h: &str) -> Option<ByteRange> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return b.parse().ok().map(ByteRange::Suffix);
    }
    let start = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    Some(ByteRange::From { start, end })
}

/// The inclusive byte span of a range over a file of `len` bytes; `None` if unsatisfiable.
pub fn resolve(r: &ByteRange, len: u64) -> Option<(u64, u64)> {
    match *r {
        ByteRange::From { start, end } => {
            if start >= len {
                return None;
            }
            let end = end.map_or(len - 1, |e| e.min(len - 1));
            (end >= start).then_some((start, end))
        }
        ByteRange::Suffix(n) => {
            if n == 0 || len == 0 {
                return None;
            }
            Some((len.saturating_sub(n), len - 1))
        }
    }
}

async fn artifact(
    State(s): State<HttpState>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Response {
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{sha:?} is not a sha256 (64 hex digits)"),
        );
    }
    let path = s.artifacts.join(sha.to_ascii_lowercase());
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return error(StatusCode::NOT_FOUND, format!("no artifact {sha}")),
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v).and_then(|r| resolve(&r, len)));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(None) => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable for {len} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    if let Err(e) = file.seek(SeekFrom::Start(start)).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let stream = tokio_util_stream(file.take(count));
    let mut resp = Response::new(stream);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// Streams a reader as a body in 64 KiB chunks.
fn tokio_util_stream(mut r: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            match r.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    let stream = futures_stream(rx);
    Body::from_stream(stream)
}

fn futures_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    struct S(tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for S {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
    let _ = &mut rx;
    S(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |h: &str, len| parse_range(h).and_then(|r| resolve(&r, len));
        assert_eq!(r("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(r("bytes=90-", 100), Some((90, 99)));
        assert_eq!(r("bytes=90-200", 100), Some((90, 99)));
        assert_eq!(r("bytes=-10", 100), Some((90, 99)));
        assert_eq!(r("bytes=100-", 100), None);
        assert_eq!(r("bytes=5-2", 100), None);
        assert_eq!(r("bytes=0-1,4-5", 100), None);
        assert_eq!(r("items=0-1", 100), None);
    }
}
