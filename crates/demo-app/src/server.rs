//! The HTTP server: an accept loop, one thread per connection, and the routes.
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200 or 503, JSON (see `health`) |
//! | `GET /work` | one work item: 200 `ok`, or 500 on an injected error |
//! | `GET /infer?input=TEXT` | 200, the deterministic inference for TEXT (see `infer`) |
//!
//! Anything else: 404 (unknown path), 405 (not GET), 400 (malformed), 408 (too slow),
//! 431 (head over 8 KiB). With `--hang`, connections are accepted and never answered.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::faults::FaultKnobs;
use crate::health;
use crate::http::{self, ReadError, Request, Response};
use crate::infer;
use crate::workload::{Outcome, Workload};

/// Connections served at once. A probe needs one; the bound keeps a flood (or a test gone wrong)
/// from exhausting threads and file descriptors on a small device.
const MAX_CONNECTIONS: usize = 128;
/// Time for a client to send its whole request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering, how long (and how much) to drain unread input before closing. Closing a
/// socket with unread data makes the kernel send a reset, which can destroy the response before
/// the client reads it: exactly the 431 case, where the client is still sending its huge head.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Everything a request handler needs, shared by all connection threads.
#[derive(Debug)]
pub struct App {
    /// The version `/health` reports (`--report-version` already applied).
    pub version: String,
    /// The knobs after the device-type gate.
    pub faults: FaultKnobs,
    pub workload: Arc<Workload>,
    /// Process start, for `uptime_s`.
    pub started: Instant,
}

/// Serves forever.
pub fn run(listener: TcpListener, app: Arc<App>) -> ! {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                eprintln!("fleet-demo-app: accept failed: {e}");
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let Some(slot) = Slot::take(&open) else {
            refuse(stream, app.faults.hang);
            continue;
        };
        let app = Arc::clone(&app);
        let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
            let _slot = slot;
            serve_connection(stream, &app);
        });
        if let Err(e) = spawned {
            // The stream went down with the closure: the client sees the connection close.
            eprintln!("fleet-demo-app: cannot start a connection thread: {e}");
        }
    }
}

/// A claim on one of `MAX_CONNECTIONS`, released on drop whatever way the thread ends.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        let before = open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(open));
        // Dropping `slot` gives the count back when over the bound.
        (before < MAX_CONNECTIONS).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Over the connection bound: say so quickly (never when hanging), from the accept thread.
fn refuse(mut stream: TcpStream, hang: bool) {
    if hang {
        return;
    }
    // A short timeout: the accept loop must not wait on a client that does not read.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = http::write_response(&mut stream, &Response::text(503, "too many connections\n"));
}

fn serve_connection(mut stream: TcpStream, app: &App) {
    if app.faults.hang {
        swallow(stream);
        return;
    }
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let response = match http::read_head(&mut stream, Instant::now() + HEAD_DEADLINE) {
        Ok(head) => match http::parse_head(&head) {
            Ok(request) => route(&request, app),
            Err(http::Malformed) => Response::text(400, "malformed request\n"),
        },
        Err(ReadError::TooLarge) => Response::text(
            431,
            format!("request head over {} bytes\n", http::MAX_HEAD_BYTES),
        ),
        Err(ReadError::TimedOut) => Response::text(408, "request head not received in time\n"),
        Err(ReadError::Gone) => return,
    };
    if http::write_response(&mut stream, &response).is_ok() {
        linger(stream);
    }
}

fn route(request: &Request, app: &App) -> Response {
    if !matches!(request.path.as_str(), "/health" | "/work" | "/infer") {
        return Response::text(404, "not found: try /health, /work or /infer?input=TEXT\n");
    }
    if request.method != "GET" {
        return Response::text(405, "only GET is supported\n");
    }
    match request.path.as_str() {
        "/health" => health_response(app),
        "/work" => match app.workload.process() {
            Outcome::Done => Response::text(200, "ok\n"),
            Outcome::Failed => Response::text(500, "injected error (--error-rate)\n"),
        },
        _ => infer_response(request, app),
    }
}

fn health_response(app: &App) -> Response {
    let now = Instant::now();
    let metrics = app.workload.snapshot(now);
    let (status, checks) = health::evaluate(&health::Inputs {
        metrics,
        since_last_frame: app.workload.since_last_frame(now),
        stall_after: app.workload.stall_bound(),
        forced_unhealthy: app.faults.unhealthy,
    });
    let body = health::render(
        status,
        &checks,
        &app.version,
        &metrics,
        now.saturating_duration_since(app.started),
        health::rss_bytes(),
    );
    Response::json(status.http_code(), body)
}

fn infer_response(request: &Request, app: &App) -> Response {
    let query = request.query.as_deref().unwrap_or("");
    match http::query_param(query, "input") {
        Ok(Some(input)) => Response::text(200, infer::answer(&input, &app.faults)),
        Ok(None) => Response::text(400, "missing ?input=TEXT\n"),
        Err(http::Malformed) => Response::text(400, "bad percent-encoding in input\n"),
    }
}

/// `--hang`: keep the connection open and never write. Reading (and discarding) keeps a client's
/// writes from blocking and lets the thread end when the client gives up.
fn swallow(mut stream: TcpStream) {
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
}

/// Half-closes, then drains what the client still sends, bounded in time and bytes.
fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match std::io::Read::read(&mut stream, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}
