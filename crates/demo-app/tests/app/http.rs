//! `/health`'s shape, the other routes, and the server under bad or slow clients.

use std::io::Write;
use std::net::TcpStream;

use crate::support::{App, PATIENCE, exchange, json_num, json_str, run};

#[test]
fn health_reports_the_documented_shape_without_any_traffic() {
    let app = App::start(&[], &[]);
    // Nobody calls /work: the worker alone must produce metrics.
    let reply = app.health_when("the worker's first frames", |b| {
        json_num(b, "requests") >= 3.0
    });
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.head.contains("Content-Type: application/json"),
        "{}",
        reply.head
    );
    let body = &reply.body;
    assert_eq!(json_str(body, "status"), "healthy", "{body}");
    assert_eq!(json_str(body, "version"), env!("CARGO_PKG_VERSION"));
    for check in ["worker", "errors", "self_test"] {
        assert_eq!(json_str(body, check), "ok", "check {check}: {body}");
    }
    assert_eq!(json_num(body, "error_rate"), 0.0);
    assert!(json_num(body, "p95_ms") > 0.0, "{body}");
    assert!(json_num(body, "rss_bytes") > 0.0, "{body}");
    json_num(body, "uptime_s");
    assert!(
        !body.contains("restarts"),
        "restarts are the supervisor's business: {body}"
    );
    assert!(body.starts_with('{') && body.ends_with('}'), "{body}");
}

#[test]
fn version_flag_sets_the_reported_version() {
    let app = App::start(&["--version", "2.4.1-rc.1"], &[]);
    assert_eq!(json_str(&app.get("/health").body, "version"), "2.4.1-rc.1");
}

#[test]
fn routes_answer_their_status() {
    let app = App::start(&[], &[]);
    let cases = [
        ("/work", 200),
        ("/infer?input=hello", 200),
        ("/infer?input=", 200),
        ("/infer", 400),
        ("/infer?input=%zz", 400),
        ("/nope", 404),
        ("/", 404),
    ];
    for (path, want) in cases {
        assert_eq!(app.get(path).status, want, "GET {path}");
    }
    let post = exchange(
        app.addr,
        b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(post.status, 405);
    let garbage = exchange(app.addr, b"\x00\x01 not http at all\r\n\r\n").unwrap();
    assert_eq!(garbage.status, 400);
}

#[test]
fn infer_is_deterministic_and_matches_the_cli() {
    let app = App::start(&[], &[]);
    // "a b" both as %20 and as +: the same input.
    let first = app.get("/infer?input=a%20b").body;
    assert_eq!(app.get("/infer?input=a+b").body, first);
    let (status, cli, _) = run(&["infer", "a b"], &[]);
    assert!(status.success());
    assert_eq!(cli, first);
    assert!(
        first.starts_with("label=") && first.contains(" score=0."),
        "{first:?}"
    );
}

#[test]
fn oversized_head_gets_431_and_the_server_keeps_serving() {
    let app = App::start(&[], &[]);
    let mut request = b"GET /health HTTP/1.1\r\nX-Padding: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 16 * 1024));
    request.extend_from_slice(b"\r\n\r\n");
    let reply = exchange(app.addr, &request).unwrap();
    assert_eq!(reply.status, 431, "{}", reply.head);
    assert_eq!(app.get("/health").status, 200);
}

#[test]
fn a_stalled_client_does_not_block_others() {
    let app = App::start(&[], &[]);
    // Half a request head, then silence.
    let mut stalled = TcpStream::connect_timeout(&app.addr, PATIENCE).unwrap();
    stalled
        .write_all(b"GET /health HTTP/1.1\r\nHost: te")
        .unwrap();
    assert_eq!(app.get("/health").status, 200);
    // And a client that connects and sends nothing at all.
    let _silent = TcpStream::connect_timeout(&app.addr, PATIENCE).unwrap();
    assert_eq!(app.get("/health").status, 200);
}
