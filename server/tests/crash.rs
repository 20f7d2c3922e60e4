//! The real `ferrovol-server` binary: data acknowledged by FLUSH survives SIGKILL; SIGTERM answers what
//! is in flight, flushes and exits 0; an unknown data dir is refused with a reason.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use ferrovol_proto::*;

#[test]
fn flushed_data_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let mut c = RawClient::hello(addr, "n1", "");
    assert_eq!(
        status(&c.call(Request::VolumeCreate {
            kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
            name: name("keep"),
            size: 8 << 20,
            labels: Labels::new(),
            source: None
        })),
        Status::Ok
    );
    let h = open(&mut c, "keep");
    let data = pattern(1, 4 << 20);
    // Pipelined 256 KiB writes, then FLUSH; the kill comes the instant FLUSH is acknowledged.
    for (i, chunk) in data.chunks(256 << 10).enumerate() {
        c.send(&Request::Write {
            handle: h,
            offset: (i * (256 << 10)) as u64,
            data: Bytes::copy_from_slice(chunk),
            fua: false,
        });
    }
    for _ in 0..16 {
        assert_eq!(status(&c.recv().unwrap()), Status::Ok);
    }
    // And one FUA write, durable on its own.
    let fua = pattern(2, 4096);
    assert_eq!(
        status(&c.call(Request::Write {
            handle: h,
            offset: 6 << 20,
            data: Bytes::from(fua.clone()),
            fua: true
        })),
        Status::Ok
    );
    assert_eq!(status(&c.call(Request::Flush { handle: h })), Status::Ok);
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();

    let (mut server, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let mut c = RawClient::hello(addr, "n1", "");
    let h = open(&mut c, "keep");
    let mut back = Vec::new();
    for i in 0..16u64 {
        match c.call(Request::Read { handle: h, offset: i * (256 << 10), len: 256 << 10 }).result {
            Ok(Reply::Data(d)) => back.extend_from_slice(&d),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(crc32fast::hash(&back), crc32fast::hash(&data), "flushed data lost");
    match c.call(Request::Read { handle: h, offset: 6 << 20, len: 4096 }).result {
        Ok(Reply::Data(d)) => assert_eq!(&d[..], &fua[..]),
        other => panic!("{other:?}"),
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn sigterm_answers_in_flight_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let mut c = RawClient::hello(addr, "n1", "");
    assert_eq!(
        status(&c.call(Request::VolumeCreate {
            kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
            name: name("t"),
            size: 64 << 20,
            labels: Labels::new(),
            source: None
        })),
        Status::Ok
    );
    let h = open(&mut c, "t");
    let n = 32;
    let mut block_of = std::collections::HashMap::new();
    for i in 0..n {
        let id = c.send(&Request::Write {
            handle: h,
            offset: i * (1 << 20),
            data: Bytes::from(pattern(i, 1 << 20)),
            fua: false,
        });
        block_of.insert(id, i);
    }
    c.send(&Request::Flush { handle: h });
    // SAFETY: kill(2) with a valid pid and signal number.
    let rc = unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    // Every request the server read is answered; the rest are cut off by the close (the client resends).
    let mut acked = vec![];
    while let Some(r) = c.recv() {
        assert_eq!(status(&r), Status::Ok);
        acked.extend(block_of.get(&r.request_id).copied());
    }
    let out = server.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    // Whatever was acknowledged is on disk after the restart.
    let (mut server, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let mut c = RawClient::hello(addr, "n1", "");
    let h = open(&mut c, "t");
    for i in acked {
        match c.call(Request::Read { handle: h, offset: i * (1 << 20), len: 1 << 20 }).result {
            Ok(Reply::Data(d)) => assert_eq!(&d[..], &pattern(i, 1 << 20)[..], "acknowledged block {i} lost"),
            other => panic!("{other:?}"),
        }
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn refuses_a_foreign_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("thesis.tex"), "precious").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol-server"))
        .args(["--data", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a ferrovol data dir"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("thesis.tex")).unwrap(), "precious");
}

/// The real binary: a second server on one data dir exits non-zero naming the holder's pid (the
/// first keeps serving); the deploy placeholder token and short tokens are refused at startup;
/// tokens never come from argv (there is no flag for them).
#[test]
fn one_server_per_data_dir_and_no_placeholder_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol-server"))
        .args(["--data", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another ferrovol server") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    let mut c = RawClient::hello(addr, "n1", "");
    assert!(c.call(Request::StoreStat).result.is_ok(), "the first server still serves");
    first.kill().unwrap();
    first.wait().unwrap();

    let other = tempfile::tempdir().unwrap();
    let token_file = other.path().join("admin");
    for (bad, why) in [("change-me-before-deploying", "placeholder"), ("short", "fewer than")] {
        std::fs::write(&token_file, bad).unwrap();
        for (flag, env) in [(true, false), (false, true)] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovol-server"));
            cmd.args(["--data", other.path().join("d").to_str().unwrap(), "--listen", "127.0.0.1:0"]);
            if flag {
                cmd.arg("--admin-token-file").arg(&token_file);
            }
            if env {
                cmd.env("FERROVOL_JOIN_TOKEN", bad);
            }
            let out = cmd.output().unwrap();
            assert!(!out.status.success(), "{bad:?} accepted");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(why) && err.contains("openssl rand"), "{err}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol-server"))
        .args(["--data", other.path().join("d").to_str().unwrap(), "--token", "0123456789abcdef0123"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a token on the command line must not be accepted");
}

/// The real binary with `--tls-cert/--tls-key`: a TLS client completes HELLO; a plaintext client
/// gets one plaintext error saying that TLS is required, and is closed.
#[test]
fn tls_flags_serve_tls_and_refuse_plaintext() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let pki = ferrovol_proto::tls::generate(&dir.path().join("pki"), &["127.0.0.1"], "c").unwrap();
    let tls = [
        "--tls-cert".as_ref(),
        pki.server_cert.as_os_str(),
        "--tls-key".as_ref(),
        pki.server_key.as_os_str(),
    ];
    let (mut child, addr) = spawn_server_with(&dir.path().join("d"), "127.0.0.1:0", &tls);

    let mut plain = RawClient::connect(addr);
    plain.send_bytes(&hello_request("p", "").encode(RequestId(1)).to_bytes()).unwrap();
    let r = plain.recv().expect("an error before closing");
    assert!(matches!(&r.result, Err(e) if e.message.contains("requires TLS")), "{r:?}");
    assert!(plain.is_closed());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let config = ferrovol_proto::tls::client_config(&pki.ca, None).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ferrovol_proto::tls::server_name(&addr.to_string()).unwrap();
        let mut tls = ferrovol_proto::tls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
        tls.write_all(&hello_request("t", "").encode(RequestId(1)).to_bytes()).await.unwrap();
        let mut buf = bytes::BytesMut::new();
        let resp = loop {
            if let Some(raw) = codec::split_response(&mut buf).unwrap() {
                break Response::parse(raw).unwrap();
            }
            assert!(tls.read_buf(&mut buf).await.unwrap() > 0, "closed");
        };
        assert!(matches!(resp.result, Ok(Reply::Hello(_))), "{resp:?}");
    });
    child.kill().unwrap();
    child.wait().unwrap();
}
