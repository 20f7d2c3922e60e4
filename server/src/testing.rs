//! An in-process server for tests: a real `Server` on 127.0.0.1, on its own runtime and thread, that a
//! test can crash (`kill`) and start again on the same port and data dir. Panics on setup failures:
//! it is for tests only.
#![allow(clippy::unwrap_used)] // test support: a failure to start is a test failure

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::{Auth, Server, ServerConfig};

/// A server on its own runtime in its own thread; `kill` (or drop) stops it abruptly, like a crash of
/// the process: connections are cut and nothing more is answered.
#[derive(Debug)]
pub struct TestServer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start(dir: &Path, addr: &str) -> Self {
        Self::start_with_token(dir, addr, Some("tok"))
    }

    /// A server whose admin token is `token` (`None`: open, every client is admin).
    pub fn start_with_token(dir: &Path, addr: &str, token: Option<&str>) -> Self {
        Self::start_with_auth(dir, addr, Auth { admin_token: token.map(str::to_owned), join_token: None })
    }

    pub fn start_with_auth(dir: &Path, addr: &str, auth: Auth) -> Self {
        Self::start_with(dir, addr, auth, None)
    }

    /// With TLS on the port when `tls` is given.
    pub fn start_with(
        dir: &Path,
        addr: &str,
        auth: Auth,
        tls: Option<std::sync::Arc<ferrovol_proto::tls::ServerConfig>>,
    ) -> Self {
        let mut config = ServerConfig::new(dir, addr.parse().unwrap());
        config.auth = auth;
        config.tls = tls;
        Self::start_config(config)
    }

    /// A server with any configuration.
    pub fn start_config(config: ServerConfig) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let server = rt.block_on(async {
                // The previous instance's port may take a moment to be free again.
                for _ in 0..100 {
                    match Server::bind(config.clone()).await {
                        Ok(s) => return s,
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                panic!("cannot bind {}", config.listen);
            });
            addr_tx.send(server.local_addr().unwrap()).unwrap();
            rt.spawn(server.run(std::future::pending::<()>()));
            let _ = stop_rx.recv();
            // Drops the server's `run` future: every connection is cut at once, like a crash.
            rt.shutdown_timeout(Duration::from_secs(5));
        });
        let addr = addr_rx.recv().expect("server started");
        Self { stop: Some(stop), thread: Some(thread), addr }
    }

    pub fn kill(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Whether a privileged test can run: root, `/dev/fuse`, and each of `tools` on the usual paths.
/// Otherwise it prints `FERROVOL-SKIPPED: ...` (which CI rejects) and returns false, or panics when
/// `FERROVOL_REQUIRE_PRIVILEGED` is set.
pub fn privileged(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().any(|d| Path::new(d).join(t).exists()))
        .collect();
    if root && fuse && missing.is_empty() {
        return true;
    }
    let why =
        format!("{test} needs root, /dev/fuse and {tools:?} (root {root}, fuse {fuse}, missing {missing:?})");
    if std::env::var_os("FERROVOL_REQUIRE_PRIVILEGED").is_some() {
        panic!("{why}");
    }
    // Through the stderr handle, not println!/eprintln! (which the test harness captures): an
    // ordinary non-root `cargo test` shows what it did not run.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "FERROVOL-SKIPPED: {why}");
    false
}
