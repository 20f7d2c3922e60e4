//! The metrics endpoint of the real server binary: known I/O over real TCP moves exactly the right
//! series, and the health endpoints answer.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrovol_proto::*;

/// `GET path` over HTTP/1.1: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{out}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

fn v_in(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// The value of the series named exactly `series` (name and labels as printed).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Kills the server however the test ends.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real server on a data dir under `dir`, with its metrics endpoint: it, its address and the
/// endpoint's (both read from its stdout).
fn spawn_with_metrics(dir: &std::path::Path) -> (Kill, SocketAddr, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovol-server"))
        .args(["--data", dir.join("data").to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let child = Kill(child);
    let mut line = || {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_owned()
    };
    let (a, m) = (line(), line());
    let addr = a.strip_prefix("listening on ").unwrap_or_else(|| panic!("{a:?}")).parse().unwrap();
    let metrics = m.strip_prefix("metrics on ").unwrap_or_else(|| panic!("{m:?}")).parse().unwrap();
    (child, addr, metrics)
}

#[test]
fn known_io_moves_the_right_series() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr, metrics) = spawn_with_metrics(dir.path());

    assert_eq!(get(metrics, "/healthz").0, 200);
    assert_eq!(get(metrics, "/readyz").0, 200);
    assert_eq!(get(metrics, "/nothing").0, 404);

    let mut c = RawClient::hello(addr, "node-a", "");
    let r = c.call(Request::VolumeCreate {
        name: name("v"),
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        size: 1 << 20,
        labels: Labels::new(),
        source: None,
    });
    assert!(r.result.is_ok(), "{r:?}");
    let h = open(&mut c, "v");
    for i in 0..3u64 {
        let data = Bytes::from(vec![i as u8 + 1; 4096]);
        assert!(c.call(Request::Write { handle: h, offset: i * 4096, data, fua: false }).result.is_ok());
    }
    for _ in 0..2 {
        assert!(c.call(Request::Read { handle: h, offset: 0, len: 8192 }).result.is_ok());
    }
    // Beyond the end: an error, counted by its status.
    let r = c.call(Request::Read { handle: h, offset: 1 << 20, len: 4096 });
    assert_eq!(status(&r), Status::OutOfRange);
    assert!(c.call(Request::Flush { handle: h }).result.is_ok());

    let (code, text) = get(metrics, "/metrics");
    assert_eq!(code, 200);
    let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"));
    assert_eq!(v(r#"ferrovol_server_requests_total{volume="v",op="WRITE"}"#), 3.0);
    assert_eq!(v(r#"ferrovol_server_requests_total{volume="v",op="READ"}"#), 3.0);
    assert_eq!(v(r#"ferrovol_server_requests_total{volume="v",op="FLUSH"}"#), 1.0);
    assert_eq!(v(r#"ferrovol_server_request_errors_total{volume="v",op="READ",status="out_of_range"}"#), 1.0);
    assert_eq!(v(r#"ferrovol_server_data_bytes_total{volume="v",direction="write"}"#), 3.0 * 4096.0);
    assert_eq!(v(r#"ferrovol_server_data_bytes_total{volume="v",direction="read"}"#), 2.0 * 8192.0);
    assert_eq!(v(r#"ferrovol_server_request_duration_seconds_count{volume="v",class="write"}"#), 3.0);
    assert_eq!(v(r#"ferrovol_server_request_duration_seconds_count{volume="v",class="read"}"#), 3.0);
    let sum = v(r#"ferrovol_server_request_duration_seconds_sum{volume="v",class="write"}"#);
    assert!(sum > 0.0 && sum < 10.0, "{sum}");
    assert_eq!(v(r#"ferrovol_volume_size_bytes{volume="v",kind="block"}"#), f64::from(1u32 << 20));
    assert_eq!(v(r#"ferrovol_volume_writer_attached{volume="v",node="node-a"}"#), 1.0);
    assert_eq!(v("ferrovol_store_volumes"), 1.0);
    assert!(v("ferrovol_store_capacity_bytes") > 0.0);
    assert!(v("ferrovol_server_connections") >= 1.0);

    // A failed handshake is counted as a refusal, by its reason.
    let mut bad = RawClient::connect(addr);
    let Request::Hello(mut hello) = hello_request("node-b", "") else { unreachable!() };
    (hello.version_min, hello.version_max) = (200, 201);
    let r = bad.call(Request::Hello(hello));
    assert_eq!(status(&r), Status::UnsupportedVersion);
    let (_, text) = get(metrics, "/metrics");
    assert_eq!(
        v_in(&text, r#"ferrovol_server_connections_refused_total{reason="unsupported_version"}"#),
        1.0
    );
    // A deleted volume's series go with it.
    assert!(c.call(Request::Close { handle: h }).result.is_ok());
    let node = NodeId::try_from("node-a").unwrap();
    assert!(c.call(Request::AttachClear { name: name("v"), node, generation: 0 }).result.is_ok());
    let r = c.call(Request::VolumeDelete { name: name("v"), force: false });
    assert!(r.result.is_ok(), "{r:?}");
    let (_, text) = get(metrics, "/metrics");
    assert!(!text.contains(r#"volume="v""#), "series of the deleted volume remain:\n{text}");
    assert_eq!(v_in(&text, "ferrovol_store_volumes"), 0.0);
}

/// The series names the Grafana dashboard (deploy/grafana/ferrovol.json) queries.
pub fn dashboard_series() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/ferrovol.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    queries.extend(
        dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["definition"].as_str().map(str::to_owned)),
    );
    let mut names = Vec::new();
    for q in &queries {
        let mut rest = q.as_str();
        while let Some(i) = rest.find("ferrovol_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            names.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_dashboard_queries_series_the_server_exports() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr, metrics) = spawn_with_metrics(dir.path());
    // Every kind of series once: I/O, an error, a writer, a refusal.
    let mut c = RawClient::hello(addr, "node-a", "");
    let r = c.call(Request::VolumeCreate {
        name: name("v"),
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        size: 1 << 20,
        labels: Labels::new(),
        source: None,
    });
    assert!(r.result.is_ok(), "{r:?}");
    let h = open(&mut c, "v");
    assert!(c
        .call(Request::Write { handle: h, offset: 0, data: Bytes::from(vec![1; 4096]), fua: false })
        .result
        .is_ok());
    assert!(c.call(Request::Read { handle: h, offset: 1 << 20, len: 4096 }).result.is_err());
    let mut bad = RawClient::connect(addr);
    let Request::Hello(mut hello) = hello_request("node-b", "") else { unreachable!() };
    (hello.version_min, hello.version_max) = (200, 201);
    assert!(bad.call(Request::Hello(hello)).result.is_err());
    let (_, text) = get(metrics, "/metrics");
    let exported =
        |name: &str| text.lines().any(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(['{', ' '])));
    for name in dashboard_series() {
        if name.starts_with("ferrovol_csi_") {
            continue; // the CSI plugin's (csi/tests/metrics.rs)
        }
        assert!(
            ["ferrovol_server_", "ferrovol_store_", "ferrovol_volume_"].iter().any(|p| name.starts_with(p)),
            "the dashboard queries {name}, which no ferrovol process exports"
        );
        assert!(exported(&name), "the dashboard queries {name}, which the server does not export:\n{text}");
    }
}
