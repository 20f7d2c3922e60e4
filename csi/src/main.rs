//! `ferrovol-csi`: the CSI driver binary (see the crate docs), and its hidden `__attach` subcommand,
//! the long-lived process that serves one staged volume's FUSE file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferrovol_client::ConnectOptions;
use ferrovol_csi::node::{ATTACH_SUBCOMMAND, MOUNT_SUBCOMMAND};
use ferrovol_csi::{Config, Mode};
use ferrovol_proto::{NodeId, VolumeName};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The ferrovol Kubernetes CSI driver (csi.ferrovol.io).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The CSI socket kubelet or the sidecars connect to.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's id (as Kubernetes knows the node); the id a node's writes carry for fencing.
    #[arg(long, env = "NODE_ID")]
    node_id: NodeId,
    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// The ferrovol server.
    #[arg(long, env = "FERROVOL_SERVER", default_value = ferrovol_client::DEFAULT_SERVER)]
    server: String,
    /// File holding the token (else FERROVOL_TOKEN): the admin token for the controller, the join
    /// token for node plugins (each node then enrolls and keeps its own credential in
    /// --credential-file). Never on the command line.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the node plugin keeps its node credential (default: STATE_DIR/credential).
    #[arg(long)]
    credential_file: Option<PathBuf>,
    /// TLS: verify the server against this CA (PEM); without it, plaintext.
    #[arg(long, env = "FERROVOL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// TLS: a client certificate (PEM) for a server that requires one.
    #[arg(long, env = "FERROVOL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS: the client certificate's key (PEM).
    #[arg(long, env = "FERROVOL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where the node keeps what must survive its restart (staged volumes, FUSE files, attach logs).
    #[arg(long, default_value = "/var/lib/ferrovol-csi")]
    state_dir: PathBuf,
    /// Seconds an attached volume's I/O waits for a lost server before failing with EIO.
    #[arg(long, default_value_t = 120)]
    io_timeout_s: u64,
    /// The most volumes this node stages at once, reported to Kubernetes in NodeGetInfo and
    /// enforced (RESOURCE_EXHAUSTED beyond it). 0: the loop driver's fixed device count when it has
    /// one, else 256 (each volume costs a loop device, an attach process and a FUSE connection).
    #[arg(long, default_value_t = 0)]
    max_volumes_per_node: i64,
    /// Serve Prometheus metrics on this address (`/metrics`: gRPC calls by method and code, and their
    /// latency; `/healthz`, `/readyz`), e.g. 0.0.0.0:9701. Off when not given.
    #[arg(long, env = "FERROVOL_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Log format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The node attach daemon's socket. Node mode: attach through it (so that mounts outlive this
    /// plugin's container); without it, this plugin starts the attach processes itself. Attachd
    /// mode: listen on it (default /run/ferrovol/attachd.sock).
    #[arg(long, env = "FERROVOL_ATTACHD")]
    attachd: Option<PathBuf>,
    /// The keeper's socket. Node mode: serve it (hold a second copy of every mount's FUSE fds, so
    /// a mount outlives the death of the attach daemon's container). Attachd mode: deposit every
    /// mount with it, and restart the mounts whose processes all died.
    #[arg(long, env = "FERROVOL_KEEPER_SOCKET")]
    keeper: Option<PathBuf>,
    /// Node mode: seconds the keeper holds a mount whose processes all died and that no attach
    /// daemon adopts; then it lets go, and the mount fails (ENOTCONN) instead of waiting for ever.
    #[arg(long, default_value_t = 900)]
    keeper_orphan_timeout_s: u64,
}

/// `ferrovol-csi __attach`: serves one volume over a FUSE file until it is unmounted.
#[derive(Debug, Parser)]
#[command(name = "ferrovol-csi __attach")]
struct AttachArgs {
    #[arg(long)]
    server: String,
    #[arg(long)]
    node_id: NodeId,
    #[arg(long, default_value_t = 120)]
    io_timeout_s: u64,
    #[arg(long)]
    volume: VolumeName,
    #[arg(long)]
    path: PathBuf,
    #[arg(long)]
    read_only: bool,
    /// Open read-write under this writer attachment generation (from ControllerPublish); without
    /// it, a read-write attach takes the node's attachment itself and releases it at the end.
    #[arg(long, conflicts_with = "read_only")]
    generation: Option<u64>,
}

/// `ferrovol-csi __mount`: serves one fs volume as a FUSE mount until it is unmounted.
#[derive(Debug, Parser)]
#[command(name = "ferrovol-csi __mount")]
struct MountArgs {
    #[arg(long)]
    server: String,
    #[arg(long)]
    node_id: NodeId,
    #[arg(long, default_value_t = 120)]
    io_timeout_s: u64,
    #[arg(long)]
    volume: VolumeName,
    #[arg(long)]
    path: PathBuf,
    #[arg(long)]
    read_only: bool,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The attach process's TLS files: from the environment its plugin set.
fn tls_files() -> Option<ferrovol_csi::TlsFiles> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    Some(ferrovol_csi::TlsFiles {
        ca: var("FERROVOL_TLS_CA")?,
        cert: var("FERROVOL_TLS_CERT").zip(var("FERROVOL_TLS_KEY")),
    })
}

/// How a mount's process connects: the server, node and secrets its plugin passed.
fn client_options(server: &str, node_id: NodeId, io_timeout_s: u64) -> anyhow::Result<ConnectOptions> {
    Ok(ConnectOptions {
        tls: tls_files().map(|f| f.load(server)).transpose()?,
        node_id,
        token: std::env::var("FERROVOL_TOKEN").unwrap_or_default(),
        credential_file: std::env::var_os("FERROVOL_CREDENTIAL_FILE").map(Into::into),
        io_timeout: Duration::from_secs(io_timeout_s.max(1)),
        ..ConnectOptions::default()
    })
}

fn attach(args: AttachArgs) -> ExitCode {
    let opts = match client_options(&args.server, args.node_id.clone(), args.io_timeout_s) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ferrovol-csi attach: {e}");
            return ExitCode::FAILURE;
        }
    };
    use ferrovol_client::fuse::Access;
    let access = match (args.read_only, args.generation) {
        (true, _) => Access::ReadOnly,
        (false, Some(generation)) => Access::WriterAt { generation },
        (false, None) => Access::Writer { takeover: false },
    };
    let served = ferrovol_client::fuse::serve(&args.server, opts, &args.volume, &args.path, access, |_| {
        println!("ready");
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovol-csi attach: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mount(args: MountArgs) -> ExitCode {
    let opts = match client_options(&args.server, args.node_id.clone(), args.io_timeout_s) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ferrovol-csi mount: {e}");
            return ExitCode::FAILURE;
        }
    };
    use ferrovol_client::fuse::files::{mount, MountOptions, Ttls};
    let mo = MountOptions { read_only: args.read_only, ttl: Ttls::STANDARD, sync_writes: false };
    match mount(&args.server, opts, &args.volume, &args.path, mo, || println!("ready")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovol-csi mount: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--mode attachd`: the node attach daemon, starting `__attach` processes of this binary.
fn attachd(config: Config) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ferrovol-csi: cannot find our own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = config.attachd.clone().unwrap_or_else(|| ferrovol_client::attachd::DEFAULT_SOCKET.into());
    let daemon = ferrovol_client::attachd::DaemonConfig {
        log_dir: config.state_dir.join("attachd"),
        socket,
        keeper: config.keeper.clone(),
        node_id: config.node_id.to_string(),
        server: config.server.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        holder: Box::new(move |req| Ok(ferrovol_csi::node::attach_command(&exe, &config, req))),
    };
    match ferrovol_client::attachd::serve(daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovol-csi attachd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(MOUNT_SUBCOMMAND) {
        let args = MountArgs::parse_from(std::env::args().skip(1));
        init_tracing(LogFormat::Text);
        return mount(args);
    }
    if std::env::args().nth(1).as_deref() == Some(ATTACH_SUBCOMMAND) {
        let args = AttachArgs::parse_from(std::env::args().skip(1));
        init_tracing(LogFormat::Text);
        return attach(args);
    }
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let token = match ferrovol_proto::secret::read("token", cli.token_file.as_deref(), "FERROVOL_TOKEN") {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => {
            eprintln!("ferrovol-csi: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls_files = cli
        .tls_ca
        .clone()
        .map(|ca| ferrovol_csi::TlsFiles { ca, cert: cli.tls_cert.clone().zip(cli.tls_key.clone()) });
    let tls = match tls_files.as_ref().map(|f| f.load(&cli.server)).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferrovol-csi: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        tls_files,
        tls,
        mode: cli.mode,
        node_id: cli.node_id,
        server: cli.server,
        token,
        credential_file: cli.credential_file.unwrap_or_else(|| cli.state_dir.join("credential")),
        state_dir: cli.state_dir,
        io_timeout: Duration::from_secs(cli.io_timeout_s.max(1)),
        max_volumes_per_node: cli.max_volumes_per_node,
        attachd: cli.attachd,
        keeper: cli.keeper,
        keeper_orphan_timeout: Duration::from_secs(cli.keeper_orphan_timeout_s),
    };
    if config.mode == Mode::Attachd {
        if cli.metrics_listen.is_some() {
            tracing::warn!("--metrics-listen is not served in attachd mode (it has no series yet); ignored");
        }
        return attachd(config);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovol-csi: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async {
        let _metrics = match &cli.metrics_listen {
            Some(addr) => {
                let mut registry = prometheus_client::registry::Registry::default();
                ferrovol_csi::metrics::register(&mut registry);
                // Ready as soon as it serves: the CSI socket is made right after.
                let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
                let endpoint = ferrovol_proto::metrics::Endpoint::new(registry, ready, || {});
                let (bound, serving) =
                    ferrovol_proto::metrics::start(addr, std::sync::Arc::new(endpoint)).await?;
                tracing::info!(%bound, "metrics endpoint listening");
                Some(serving)
            }
            None => None,
        };
        ferrovol_csi::serve(config, &cli.endpoint).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovol-csi: {e:#}");
            ExitCode::FAILURE
        }
    }
}
