//! The CSI plugin's metrics endpoint (the real binary, over its socket): known gRPC calls move
//! exactly the right series.
#![allow(clippy::unwrap_used)] // tests: a panic is a failure

mod common;

use std::io::{Read, Write};

use common::*;
use ferrovol_proto::csi::*;
use ferrovol_server::testing::TestServer;

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{out}"));
    (code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_move_the_right_series() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    // A free port for the endpoint (the plugin's stdout is not read).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let addr = server.addr.to_string();
    let mut p =
        Plugin::start_with_args(dir.path(), &addr, "ctl", "controller", &["--metrics-listen", &metrics])
            .await;
    for _ in 0..3 {
        p.identity.probe(ProbeRequest {}).await.unwrap();
    }
    // No name: INVALID_ARGUMENT.
    let err = p.controller.create_volume(CreateVolumeRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(get(&metrics, "/healthz").0, 200);
    let (code, text) = get(&metrics, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(value(&text, r#"ferrovol_csi_rpcs_total{method="Probe",code="OK"}"#), 3.0);
    assert_eq!(
        value(&text, r#"ferrovol_csi_rpcs_total{method="CreateVolume",code="INVALID_ARGUMENT"}"#),
        1.0
    );
    assert_eq!(value(&text, r#"ferrovol_csi_rpc_duration_seconds_count{method="Probe"}"#), 3.0);
    // Every CSI series the Grafana dashboard queries exists.
    let dash =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/ferrovol.json"))
            .unwrap();
    let _: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let mut rest = dash.as_str();
    let mut checked = 0;
    while let Some(i) = rest.find("ferrovol_csi_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        assert!(
            text.lines().any(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(['{', ' ']))),
            "the dashboard queries {name}, which the plugin does not export:\n{text}"
        );
        checked += 1;
        rest = &tail[end..];
    }
    assert!(checked >= 2, "the dashboard queries no CSI series");
    drop(p);
    drop(server);
}
