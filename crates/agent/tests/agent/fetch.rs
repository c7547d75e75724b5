//! Downloads: resumed with Range after a cut; refused before any byte when the disk is short.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;

use fleet_proto::device::EventKind;
use fleet_proto::{Refusal, SignedRelease};

use crate::support::*;

/// Serves `data` at any path: the first response declares the full length but is cut after
/// half the bytes; later requests honour `Range: bytes=N-` with 206. Records request heads.
fn cutting_server(data: Vec<u8>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            log.lock().unwrap().push(head.clone());
            let range = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("range: bytes=")
                        .map(str::to_owned)
                })
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
            if n == 0 {
                let half = data.len() / 2;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    data.len()
                );
                let _ = stream.write_all(&data[..half]);
                let _ = stream.flush();
                // Dropped mid-body.
            } else if let Some(from) = range {
                let _ = write!(
                    stream,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                    data.len() - from,
                    data.len() - 1,
                    data.len()
                );
                let _ = stream.write_all(&data[from..]);
            } else {
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    data.len()
                );
                let _ = stream.write_all(&data);
            }
        }
    });
    (port, seen)
}

#[test]
fn a_cut_download_resumes_from_the_byte_offset() {
    let dev = Device::new("resume", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = Agent::start(&dev, &[]);
    let v = version("1.0.0", &[]);
    let (path, sha, size) = artifact(dev.dir.path(), &v);
    let data = std::fs::read(&path).unwrap();
    let (port, seen) = cutting_server(data.clone());
    let r = release(
        1,
        &v,
        format!("http://127.0.0.1:{port}/app.tar.gz"),
        sha,
        size,
    );
    obs.publish_desired(&desired(
        &dev.id,
        1,
        Some(SignedRelease::sign(&r, &key())),
        0,
    ));
    obs.wait_event("committed", PATIENCE, |e| {
        matches!(e.kind, EventKind::Committed { .. })
    });
    dev.wait_serving("1.0.0");
    let heads = seen.lock().unwrap().clone();
    assert!(heads.len() >= 2, "expected a retry, saw {heads:?}");
    assert!(
        !heads[0].to_ascii_lowercase().contains("range:"),
        "first request: {}",
        heads[0]
    );
    let want = format!("range: bytes={}-", data.len() / 2);
    assert!(
        heads[1].to_ascii_lowercase().contains(&want),
        "second request lacks {want}: {}",
        heads[1]
    );
}

#[test]
fn not_enough_disk_is_refused_before_downloading() {
    let dev = Device::new("disk", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = Agent::start(&dev, &[]);
    let v = version("1.0.0", &[]);
    let (port, seen) = cutting_server(vec![0; 10]);
    let (_, sha, size) = artifact(dev.dir.path(), &v);
    let mut r = release(
        1,
        &v,
        format!("http://127.0.0.1:{port}/app.tar.gz"),
        sha,
        size,
    );
    r.resources.disk_bytes = 1 << 60;
    obs.publish_desired(&desired(
        &dev.id,
        1,
        Some(SignedRelease::sign(&r, &key())),
        0,
    ));
    let e = obs.wait_event("refused", PATIENCE, |e| {
        matches!(e.kind, EventKind::Refused { .. })
    });
    let EventKind::Refused { reason } = &e.kind else {
        unreachable!()
    };
    let Refusal::InsufficientDisk { needed, available } = reason else {
        panic!("{reason:?}")
    };
    assert_eq!(*needed, (1u64 << 60) + size);
    assert!(*available > 0 && *available < *needed);
    let text = reason.to_string();
    assert!(
        text.contains(&needed.to_string()) && text.contains(&available.to_string()),
        "{text}"
    );
    obs.wait_state("applied", |r| r.applied_sequence == 1);
    assert!(seen.lock().unwrap().is_empty(), "a download started");
    assert!(
        !obs.events()
            .iter()
            .any(|e| matches!(e.kind, EventKind::DownloadStarted { .. }))
    );
}
