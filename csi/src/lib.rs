//! `ferrovol-csi`: the Kubernetes CSI driver. Identity, Controller and Node services over gRPC on a
//! unix socket; the controller speaks ferrovol's control opcodes to the server, the node attaches
//! volumes through FUSE (a separate, long-lived attach process per volume), a loop device and a
//! filesystem. See `csi/README.md` for the flows and where each mount lives.

pub mod controller;
pub mod error;
pub mod identity;
mod locks;
pub mod metrics;
pub mod names;
pub mod node;
pub mod rpc;
mod state;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ferrovol_client::{ConnectOptions, Session};
use ferrovol_proto::csi::controller_server::ControllerServer;
use ferrovol_proto::csi::identity_server::IdentityServer;
use ferrovol_proto::csi::node_server::NodeServer;
use ferrovol_proto::NodeId;
use tokio::sync::Mutex;
use tracing::info;

pub use locks::VolumeLocks;

/// The driver name kubelet and the sidecars know us by.
pub const DRIVER_NAME: &str = "csi.ferrovol.io";
/// The topology key: nodes and volumes of one ferrovol server share its value (the server id).
pub const TOPOLOGY_KEY: &str = "topology.csi.ferrovol.io/server";

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    All,
    /// The node attach daemon (`ferrovol_client::attachd`), in a DaemonSet of its own: it runs
    /// every mount's processes, so that the node plugin can restart without touching a mount.
    Attachd,
}

/// Everything the services need to know.
#[derive(Clone)]
pub struct Config {
    pub mode: Mode,
    /// The CSI node id (this node's, in node mode); also the ferrovol node id its writes carry.
    pub node_id: NodeId,
    pub server: String,
    /// The admin token (controller) or the join token (node).
    pub token: String,
    /// Where this node's credential is kept once it enrolled (shared with its attach processes).
    pub credential_file: PathBuf,
    /// TLS to the server: the CA, and an optional client certificate and key (PEM files, passed on
    /// to the attach processes too).
    pub tls_files: Option<TlsFiles>,
    pub tls: Option<ferrovol_client::ClientTls>,
    /// Where the node keeps what must survive a restart: staged volumes, image files, attach logs.
    pub state_dir: PathBuf,
    /// Seconds an attached volume's I/O waits for the server before failing with EIO.
    pub io_timeout: Duration,
    /// Reported in NodeGetInfo.
    pub max_volumes_per_node: i64,
    /// The attach daemon's socket: the node plugin attaches through it (else it starts attach
    /// processes itself, which then die with its container); attachd mode listens on it.
    pub attachd: Option<PathBuf>,
    /// The keeper's socket: the node plugin serves it (the second holder of every mount's FUSE
    /// fds, see `ferrovol_client::fuse::keep`); attachd mode deposits mounts with it and claims
    /// orphans from it.
    pub keeper: Option<PathBuf>,
    /// How long the keeper holds a mount that no attach daemon adopts (then it fails, ENOTCONN).
    pub keeper_orphan_timeout: Duration,
}

/// The PEM files of a client's TLS settings.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// Loads them for server `addr`.
    pub fn load(&self, addr: &str) -> Result<ferrovol_client::ClientTls, ferrovol_proto::tls::TlsError> {
        let cert = self.cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        ferrovol_client::ClientTls::from_files(addr, &self.ca, cert)
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("mode", &self.mode)
            .field("node_id", &self.node_id)
            .field("server", &self.server)
            .field("credential_file", &self.credential_file)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Config {
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            node_id: self.node_id.clone(),
            token: self.token.clone(),
            // The controller presents the admin token; a node credential file would shadow it.
            credential_file: (self.mode != Mode::Controller).then(|| self.credential_file.clone()),
            tls: self.tls.clone(),
            io_timeout: self.io_timeout,
            connect_timeout: Duration::from_secs(10),
            ..ConnectOptions::default()
        }
    }
}

/// A lazily (re)connected control session to the server, shared by the services.
#[derive(Debug)]
pub struct ServerLink {
    config: Config,
    session: Mutex<Option<Session>>,
}

impl ServerLink {
    pub fn new(config: Config) -> Self {
        Self { config, session: Mutex::new(None) }
    }

    /// The session, connecting on first use (the client reconnects by itself after that).
    pub async fn session(&self) -> Result<Session, tonic::Status> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = Session::connect(&self.config.server, self.config.connect_options()).await.map_err(|e| {
            tonic::Status::unavailable(format!(
                "cannot reach the ferrovol server {}: {e}",
                self.config.server
            ))
        })?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// The server's id (the topology value).
    pub async fn server_id(&self) -> Result<String, tonic::Status> {
        Ok(self.session().await?.server_info().server_id.clone())
    }
}

/// Serves the configured services on a unix socket until SIGTERM/SIGINT.
pub async fn serve(config: Config, endpoint: &str) -> anyhow::Result<()> {
    let path = socket_path(endpoint)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket left by a previous run (kill -9) is ours to replace; anything else is not.
    match std::fs::symlink_metadata(&path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove stale {}", path.display()))?
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket; refusing to replace it", path.display()),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);

    let link = Arc::new(ServerLink::new(config.clone()));
    let locks = VolumeLocks::default();
    let identity = identity::IdentityService::new(config.clone(), link.clone());
    let mut router = tonic::transport::Server::builder().add_service(IdentityServer::new(identity));
    let controller = matches!(config.mode, Mode::Controller | Mode::All)
        .then(|| ControllerServer::new(controller::ControllerService::new(link.clone(), locks.clone())));
    router = router.add_optional_service(controller);
    let node = if matches!(config.mode, Mode::Node | Mode::All) {
        if let Some(k) = &config.keeper {
            // Its own threads: it must answer even while the runtime is busy.
            let bound = ferrovol_client::fuse::keep::bind_socket(k, "keeper")
                .with_context(|| format!("cannot serve the keeper on {}", k.display()))?;
            info!(socket = %k.display(), "keeper listening");
            let timeout = config.keeper_orphan_timeout;
            std::thread::Builder::new().name("ferrovol-keeper".into()).spawn(move || {
                if let Err(e) = ferrovol_client::fuse::keep::serve(bound, timeout) {
                    tracing::error!(error = %e, "the keeper stopped");
                }
            })?;
        }
        let n = node::NodeService::new(config.clone(), link.clone(), locks.clone())?;
        Some(NodeServer::new(n))
    } else {
        None
    };
    let router = router.add_optional_service(node);
    info!(endpoint, mode = ?config.mode, node_id = %config.node_id, server = %config.server, "serving");
    router
        .serve_with_incoming_shutdown(incoming, async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            info!("signal received; stopping (attached volumes stay attached)");
        })
        .await
        .context("gRPC server failed")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// `unix:///csi/csi.sock` or `unix:/csi/csi.sock` or a plain path.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let p = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("unix:")).unwrap_or(endpoint);
    if p.is_empty() || !p.starts_with('/') {
        anyhow::bail!("--endpoint must be unix:///absolute/path.sock, got {endpoint:?}");
    }
    Ok(PathBuf::from(p))
}
