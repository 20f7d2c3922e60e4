//! The `ferrovol` command line.

pub mod attach;
pub mod attachd;
pub mod mount;
pub mod up;
pub mod volume_cmd;

use std::time::Duration;

use crate::bench::Workload;
use clap::{Args, Parser, Subcommand};
use ferrovol_client::{ConnectOptions, Session};
use ferrovol_proto::{NodeId, VolumeName};

/// `--version` (on `ferrovol` itself only): the crate version, the git revision it was built from,
/// and the protocol versions it speaks.
pub static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (git {}, protocol {}..={})",
        env!("CARGO_PKG_VERSION"),
        env!("FERROVOL_GIT_REV"),
        ferrovol_proto::limits::PROTOCOL_VERSION_MIN,
        ferrovol_proto::limits::PROTOCOL_VERSION
    )
});

#[derive(Debug, Parser)]
#[command(name = "ferrovol", version = VERSION.as_str(), about = "ferrovol: network block volumes")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Server address.
    #[arg(long, global = true, env = "FERROVOL_SERVER", default_value = ferrovol_client::DEFAULT_SERVER)]
    pub server: String,
    /// File holding the token to present while this node has no credential of its own: the join
    /// token (the server then enrolls the node) or the admin token. Else FERROVOL_TOKEN. Secrets
    /// are never taken from the command line.
    #[arg(long, global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// Where this node keeps the credential the server issued when it enrolled (default: under
    /// /var/lib/ferrovol-client/credentials as root, ~/.local/state/ferrovol otherwise).
    #[arg(long, global = true, env = "FERROVOL_CREDENTIAL_FILE")]
    pub credential_file: Option<std::path::PathBuf>,
    /// TLS: verify the server against this CA (PEM); without it the connection is plaintext.
    #[arg(long, global = true, env = "FERROVOL_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// TLS: this client's certificate (PEM), for a server that requires one.
    #[arg(long, global = true, env = "FERROVOL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS: this client's private key (PEM).
    #[arg(long, global = true, env = "FERROVOL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// This client's node id (default: FERROVOL_NODE_ID, else the host name).
    #[arg(long, global = true)]
    pub node_id: Option<NodeId>,
    /// Seconds a request may wait for an answer (reconnects included) before failing.
    #[arg(long, global = true, default_value_t = 30)]
    pub io_timeout_s: u64,
    /// Log format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, inspect, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Point-in-time snapshots of volumes.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Nodes and their credentials.
    #[command(subcommand)]
    Node(NodeCmd),
    /// TLS helpers.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// Throughput harness.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// FUSE-mount a block volume over PATH (an existing regular file): PATH becomes the volume.
    Attach {
        name: VolumeName,
        path: std::path::PathBuf,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Return once the mount is ready, leaving it served by a background process.
        #[arg(long)]
        background: bool,
        /// Take the writer attachment over from the node that holds it (fencing that node's
        /// writes, even those in flight). Only when that node is known to be dead: two writers
        /// corrupt a filesystem.
        #[arg(long, conflicts_with = "read_only")]
        force_takeover: bool,
        /// Open read-write under this writer attachment generation, taken beforehand by the caller
        /// (the CSI controller); without it, attach takes the attachment itself.
        #[arg(long, hide = true, conflicts_with_all = ["read_only", "force_takeover"])]
        generation: Option<u64>,
    },
    /// The node attach daemon: attaches and detaches on request over a unix socket (the CSI node
    /// plugin's way to attach), each mount in processes of its own that outlive the daemon. With
    /// --keeper, it also restarts the mounts whose processes all died (the keeper kept their FUSE
    /// connection). Needs root.
    Attachd {
        /// The socket of its API (owner-only).
        #[arg(long, default_value = ferrovol_client::attachd::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// The keeper every mount is deposited with (see `ferrovol keeper`); run it in another
        /// container or unit than this daemon.
        #[arg(long)]
        keeper: Option<std::path::PathBuf>,
    },
    /// Holds a second copy of the FUSE fds of every mount attached through `ferrovol attachd
    /// --keeper`, so a mount outlives all of its own processes (in Kubernetes, the CSI node plugin
    /// does this). Needs root.
    Keeper {
        /// Its socket (owner-only).
        #[arg(long, default_value = ferrovol_client::attachd::DEFAULT_KEEPER)]
        socket: std::path::PathBuf,
        /// Seconds it holds a mount whose processes all died and that no attach daemon adopts;
        /// then it lets go, and the mount fails (ENOTCONN) instead of its I/O waiting for ever.
        #[arg(long, default_value_t = 900)]
        orphan_timeout_s: u64,
    },
    /// Unmount an attached volume (the attach process then exits).
    Detach { path: std::path::PathBuf },
    /// Mount an fs volume on DIR (an existing directory): its files, shared with every other node
    /// that mounts it. Needs root (FUSE for all users of the node).
    Mount {
        name: VolumeName,
        dir: std::path::PathBuf,
        /// Refuse changes.
        #[arg(long)]
        read_only: bool,
        /// Return once mounted, leaving it served by a background process.
        #[arg(long)]
        background: bool,
        /// How long the kernel may keep attributes without asking the server (ms). The server
        /// tells every mount at once when another node changes what it caches, so this only
        /// bounds staleness after a missed notice (a reconnect); 0: ask at every access.
        #[arg(long, default_value_t = 1000)]
        attr_ttl_ms: u64,
        /// How long the kernel may keep names it looked up (ms); see --attr-ttl-ms.
        #[arg(long, default_value_t = 1000)]
        entry_ttl_ms: u64,
        /// Make every write wait for the server. By default writes are asynchronous, as on NFS:
        /// write(2) returns once the data is sent, and close(2) and fsync(2) wait for every
        /// write before them and report a failed one (ENOSPC, EIO) there. O_SYNC, O_DSYNC and
        /// O_APPEND writes are always synchronous.
        #[arg(long)]
        sync_writes: bool,
    },
    /// Unmount an fs volume mounted with `ferrovol mount` (its process then exits).
    Umount { dir: std::path::PathBuf },
    /// This host's attached volumes: path, volume, server, the processes serving each (the
    /// holder, which `detach` waits for, and the worker that answers the kernel), the worker's
    /// requests in flight and its reconnects.
    Status {
        /// As JSON (one array).
        #[arg(long)]
        json: bool,
        /// Instead, what the keeper at this socket holds: each mount, how many of its processes
        /// deposited it, and for how long it has been an orphan (see `ferrovol keeper`).
        #[arg(long)]
        keeper: Option<std::path::PathBuf>,
    },
    /// The whole stack in one process: embedded server, volume, FUSE attach, loop device, ext4 (made on
    /// first use only), mounted at --mount. Ctrl-C tears it all down. Needs root.
    Up {
        /// The embedded server's data dir.
        #[arg(long, default_value = "/var/lib/ferrovol")]
        data: std::path::PathBuf,
        /// Where the filesystem is mounted.
        #[arg(long, default_value = "/mnt/ferrovol")]
        mount: std::path::PathBuf,
        /// Size of the volume when it is created.
        #[arg(long, value_parser = parse_size, default_value = "1GiB")]
        size: u64,
        /// Volume name.
        #[arg(long, default_value = "default")]
        volume: VolumeName,
        /// block: ext4 on a loop device over the volume (one node); fs: an fs volume, its files
        /// served by the embedded server and FUSE-mounted here (no loop device; other nodes may
        /// `ferrovol mount` it too).
        #[arg(long = "type", value_enum, default_value = "block")]
        kind: VolumeKind,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (thin-provisioned): a block volume, empty or from a snapshot or a volume, or
    /// an fs volume (a shared filesystem many nodes mount at once: `ferrovol mount`).
    Create {
        name: VolumeName,
        /// block: one node's disk (`ferrovol attach`); fs: a filesystem the server serves file by
        /// file to many nodes (`ferrovol mount`; at least 32Mi). Default: block, or the kind of
        /// the snapshot or volume it is made from.
        #[arg(long = "type", value_enum)]
        kind: Option<VolumeKind>,
        /// Size as a Kubernetes quantity: 64Mi, 1Gi (powers of 1024), 1G (10^9 bytes), 4096; rounded
        /// up to whole 4 KiB blocks. With --from-snapshot or --from-volume it
        /// defaults to the source's size, and may not be smaller.
        #[arg(long, value_parser = parse_size, required_unless_present_any = ["from_snapshot", "from_volume"])]
        size: Option<u64>,
        /// Start with the content of this snapshot (it must be ready).
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<VolumeName>,
        /// Start as a clone of this volume: its content at this moment (it may stay in use).
        #[arg(long)]
        from_volume: Option<VolumeName>,
    },
    /// List volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one volume.
    Stat {
        name: VolumeName,
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        name: VolumeName,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume (refused while it is open or attached).
    Delete {
        name: VolumeName,
        /// Delete although a writer attachment is recorded, once its node is known to be gone
        /// (needs the admin credential; an open volume is still refused).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum VolumeKind {
    Block,
    Fs,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Cut a point-in-time snapshot of a volume (it may stay in use meanwhile).
    Create {
        name: VolumeName,
        /// The volume to snapshot.
        #[arg(long)]
        volume: VolumeName,
        /// Return only once the snapshot is ready (where the server copies rather than reflinks,
        /// that is when its background copy is done), showing progress.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    List {
        /// Only this volume's.
        #[arg(long)]
        volume: Option<VolumeName>,
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot.
    Stat {
        name: VolumeName,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (volumes made from it are not affected).
    Delete { name: VolumeName },
}

#[derive(Debug, Subcommand)]
pub enum TlsCmd {
    /// Make a small CA, a server certificate and a client certificate in DIR (PEM; keys 0600): for
    /// tests and trying TLS out. A deployment brings its own (cert-manager, say).
    Generate {
        dir: std::path::PathBuf,
        /// DNS names or IP addresses the server certificate is for (repeat).
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
        /// The client certificate's name.
        #[arg(long, default_value = "ferrovol-client")]
        client: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Forget a node's credential (admin), so that it enrolls again with the join token: for a
    /// node that lost its credential file, or one to lock out until it does.
    Reset { node: NodeId },
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Raw protocol benchmark: the client library against a server, no FUSE.
    Raw {
        /// Volume to use (created with --size if missing).
        #[arg(long, default_value = "bench")]
        volume: VolumeName,
        #[arg(long, value_parser = parse_size, default_value = "1GiB")]
        size: u64,
        #[arg(long, value_enum)]
        workload: Workload,
        /// Requests in flight.
        #[arg(long, default_value_t = 1)]
        qd: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        runtime_s: f64,
        /// TCP connections.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Write the whole volume once before measuring.
        #[arg(long)]
        prefill: bool,
        /// Print one JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
    },
}

/// A volume size in the Kubernetes quantity grammar (see `ferrovol_proto::parse_size`: `64Mi` is
/// 2^26 bytes, `64M` 64,000,000), rounded up to a whole number of 4096-byte blocks; when it had to
/// be rounded, that is said on stderr, with the user's own words.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = ferrovol_proto::parse_size(s)?;
    if bytes == 0 {
        return Err(format!("size {s:?} is zero; a volume needs at least 4096 bytes (4Ki)"));
    }
    let rounded = bytes.div_ceil(4096).checked_mul(4096).ok_or_else(|| format!("size {s:?} is too large"))?;
    // `64M` meant 2^26 bytes to this CLI once (and to truncate -s): say what it means now.
    let decimal = s.trim().trim_end_matches(|c: char| "kMGTPE".contains(c)).len() < s.trim().len();
    if decimal && rounded == bytes {
        eprintln!(
            "ferrovol: size {s:?} is {bytes} bytes ({}): k, M, G, T are powers of 1000; Ki, Mi, Gi, Ti \
             powers of 1024",
            ferrovol_proto::format_size(bytes)
        );
    }
    if rounded != bytes {
        eprintln!(
            "ferrovol: size {s:?} is {bytes} bytes, not a whole number of 4096-byte blocks; rounded up to \
             {rounded} bytes ({})",
            ferrovol_proto::format_size(rounded)
        );
    }
    Ok(rounded)
}

pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

impl Global {
    pub fn options(&self) -> anyhow::Result<ConnectOptions> {
        let mut o = ConnectOptions::default();
        if let Some(n) = &self.node_id {
            o.node_id = n.clone();
        }
        o.token = ferrovol_proto::secret::read("token", self.token_file.as_deref(), "FERROVOL_TOKEN")?
            .unwrap_or_default();
        o.credential_file = self
            .credential_file
            .clone()
            .or_else(|| ferrovol_client::default_credential_file(o.node_id.as_str(), &self.server));
        o.io_timeout = Duration::from_secs(self.io_timeout_s.max(1));
        if let Some(ca) = &self.tls_ca {
            let client = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
            o.tls = Some(ferrovol_client::ClientTls::from_files(&self.server, ca, client)?);
        }
        Ok(o)
    }

    pub async fn connect(&self, connections: usize) -> anyhow::Result<Session> {
        let mut o = self.options()?;
        o.connections = connections;
        Ok(Session::connect(&self.server, o).await?)
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Volume(cmd) => volume_cmd::run(&cli.global, cmd).await,
        Command::Snapshot(cmd) => volume_cmd::snapshot(&cli.global, cmd).await,
        Command::Tls(TlsCmd::Generate { dir, names, client }) => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let g = ferrovol_proto::tls::generate(&dir, &names, &client)?;
            println!("CA {}", g.ca.display());
            println!("server certificate {} key {}", g.server_cert.display(), g.server_key.display());
            println!("client certificate {} key {}", g.client_cert.display(), g.client_key.display());
            Ok(())
        }
        Command::Node(NodeCmd::Reset { node }) => {
            let session = cli.global.connect(1).await?;
            session.reset_node(&node).await?;
            println!(
                "node {node}: credential forgotten; it enrolls again with the join token on its next connect"
            );
            Ok(())
        }
        Command::Status { json, keeper: Some(k) } => attach::keeper_status(&k, json),
        Command::Status { json, keeper: None } => attach::status(json),
        Command::Attach { .. }
        | Command::Detach { .. }
        | Command::Mount { .. }
        | Command::Umount { .. }
        | Command::Up { .. }
        | Command::Attachd { .. }
        | Command::Keeper { .. } => {
            anyhow::bail!("attach and detach run outside the runtime (see main)")
        }
        Command::Bench(BenchCmd::Raw {
            volume,
            size,
            workload,
            qd,
            runtime_s,
            connections,
            prefill,
            json,
        }) => {
            let session = cli.global.connect(connections).await?;
            match session.stat_volume(&volume).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(ferrovol_proto::Status::NotFound) => {
                    session.create_volume(&volume, size).await?;
                }
                Err(e) => return Err(e.into()),
            }
            let vol = session.open(&volume, false).await?;
            if prefill {
                crate::bench::prefill(&vol, size).await?;
            }
            let runtime = Duration::from_secs_f64(runtime_s.max(0.1));
            let r = crate::bench::run(&vol, workload, qd, runtime, size).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} qd={} bs={}: {:.0} IOPS, {:.1} MiB/s, p50 {:.0} us, p99 {:.0} us ({} ops in {:.1} s)",
                    r.workload.name(),
                    r.queue_depth,
                    r.block_size,
                    r.iops,
                    r.mib_per_s,
                    r.lat_p50_us,
                    r.lat_p99_us,
                    r.ops,
                    r.seconds
                );
            }
            Ok(())
        }
    }
}
