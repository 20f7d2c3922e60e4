//! The `ferrovol` binary against a real server: output, exit codes and error messages.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::process::{Command, Output};

use common::TestServer;

fn ferrovol(server: &TestServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(args)
        .env("FERROVOL_SERVER", server.addr.to_string())
        .env("FERROVOL_TOKEN", "tok")
        .output()
        .expect("run ferrovol")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr {err:?} should mention {needle:?}");
}

#[test]
fn volume_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0");
    assert!(ok(&ferrovol(&server, &["volume", "create", "web", "--size", "64MiB"])).contains("64 MiB"));
    ok(&ferrovol(&server, &["volume", "create", "db", "--size", "1Gi"]));
    fails(&ferrovol(&server, &["volume", "create", "web", "--size", "64MiB"]), "already exists");
    fails(&ferrovol(&server, &["volume", "create", "../x", "--size", "1Gi"]), "name contains");
    fails(&ferrovol(&server, &["volume", "create", "x", "--size", "12XB"]), "unknown unit");
    // Kubernetes quantities: what could mean either is refused in the user's words; a size that
    // is not whole blocks is rounded up, and that is said.
    fails(
        &ferrovol(&server, &["volume", "create", "x", "--size", "10GB"]),
        "\"10GB\" is ambiguous: write 10G",
    );
    let rounded = ferrovol(&server, &["volume", "create", "small", "--size", "1000"]);
    ok(&rounded);
    assert!(String::from_utf8_lossy(&rounded.stderr).contains("rounded up to 4096 bytes"), "{rounded:?}");
    let decimal = ferrovol(&server, &["volume", "create", "dec", "--size", "1M"]);
    assert!(String::from_utf8_lossy(&decimal.stderr).contains("is 1000000 bytes"), "{decimal:?}");
    ok(&ferrovol(&server, &["volume", "delete", "small"]));
    ok(&ferrovol(&server, &["volume", "delete", "dec"]));
    let list = ok(&ferrovol(&server, &["volume", "list"]));
    assert!(list.contains("web") && list.contains("db") && list.contains("1 GiB"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&ferrovol(&server, &["volume", "list", "--json"]))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    ok(&ferrovol(&server, &["volume", "resize", "web", "--size", "128Mi"]));
    let stat: serde_json::Value =
        serde_json::from_str(&ok(&ferrovol(&server, &["volume", "stat", "web", "--json"]))).unwrap();
    assert_eq!(stat["size"], 128u64 << 20);
    fails(&ferrovol(&server, &["volume", "resize", "web", "--size", "4Ki"]), "shrinking");
    ok(&ferrovol(&server, &["volume", "delete", "web"]));
    fails(&ferrovol(&server, &["volume", "delete", "web"]), "not found");
    fails(&ferrovol(&server, &["volume", "stat", "web"]), "not found");
}

#[test]
fn snapshot_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0");
    ok(&ferrovol(&server, &["volume", "create", "web", "--size", "16MiB"]));
    let out = ok(&ferrovol(&server, &["snapshot", "create", "web-1", "--volume", "web", "--wait"]));
    assert!(out.contains("created snapshot web-1 of volume web") && out.contains("ready"), "{out}");
    fails(&ferrovol(&server, &["snapshot", "create", "web-1", "--volume", "web"]), "already exists");
    fails(&ferrovol(&server, &["snapshot", "create", "x", "--volume", "nope"]), "not found");
    let list = ok(&ferrovol(&server, &["snapshot", "list"]));
    assert!(list.contains("web-1") && list.contains("16 MiB") && list.contains("ready"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&ferrovol(&server, &["snapshot", "list", "--volume", "web", "--json"])))
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    assert!(ok(&ferrovol(&server, &["snapshot", "list", "--volume", "other"])).lines().count() == 1);
    let stat: serde_json::Value =
        serde_json::from_str(&ok(&ferrovol(&server, &["snapshot", "stat", "web-1", "--json"]))).unwrap();
    assert_eq!((stat["source"].as_str(), stat["ready"].as_bool()), (Some("web"), Some(true)));
    // Restore and clone: the size defaults to the source's, and may not be smaller.
    let out = ok(&ferrovol(&server, &["volume", "create", "restored", "--from-snapshot", "web-1"]));
    assert!(out.contains("16 MiB") && out.contains("from snapshot web-1"), "{out}");
    let out =
        ok(&ferrovol(&server, &["volume", "create", "copy", "--from-volume", "web", "--size", "32MiB"]));
    assert!(out.contains("32 MiB") && out.contains("clone of volume web"), "{out}");
    fails(
        &ferrovol(&server, &["volume", "create", "tiny", "--from-snapshot", "web-1", "--size", "4MiB"]),
        "smaller than its source",
    );
    fails(&ferrovol(&server, &["volume", "create", "none"]), "--size");
    fails(
        &ferrovol(&server, &["volume", "create", "both", "--from-snapshot", "a", "--from-volume", "b"]),
        "cannot be used with",
    );
    ok(&ferrovol(&server, &["snapshot", "delete", "web-1"]));
    fails(&ferrovol(&server, &["snapshot", "delete", "web-1"]), "not found");
    fails(&ferrovol(&server, &["volume", "create", "again", "--from-snapshot", "web-1"]), "not found");
}

#[test]
fn clear_errors_for_connection_problems() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["volume", "list"])
        .env("FERROVOL_SERVER", server.addr.to_string())
        .env("FERROVOL_TOKEN", "nope")
        .output()
        .unwrap();
    fails(&out, "authentication failed");
    let addr = server.addr.to_string();
    server.kill();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["--server", &addr, "volume", "list"])
        .output()
        .unwrap();
    fails(&out, "cannot connect");
    // A missing port is named as such (not "invalid socket address").
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["--server", "127.0.0.1", "volume", "list"])
        .output()
        .unwrap();
    fails(&out, "no port (or not a number) in the address: write 127.0.0.1:7700");
}

#[test]
fn raw_bench_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0");
    let out = ok(&ferrovol(
        &server,
        &[
            "bench",
            "raw",
            "--workload",
            "rand-write",
            "--qd",
            "4",
            "--runtime-s",
            "0.3",
            "--size",
            "16MiB",
            "--json",
        ],
    ));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["workload"], "rand-write");
    assert!(r["ops"].as_u64().unwrap() > 0);
    assert!(r["iops"].as_f64().unwrap() > 0.0);
    // The text line names the workload as the flag does.
    let out = ok(&ferrovol(
        &server,
        &["bench", "raw", "--workload", "rand-read", "--runtime-s", "0.2", "--size", "16MiB"],
    ));
    assert!(out.starts_with("rand-read qd=1 bs=4096: "), "{out}");
}
