//! `ferrovol-server --data DIR [--listen 127.0.0.1:7700]`

/// jemalloc keeps freed large buffers for reuse instead of returning them to the kernel at once: with
/// glibc, every 1 MiB frame buffer came back as fresh pages (256 page faults and a zero-fill per MiB),
/// which halved large-block throughput at queue depth > 1.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferrovol_server::{Server, ServerConfig};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(name = "ferrovol-server", version, about = "ferrovol storage server: exports volumes over TCP")]
struct Args {
    /// Data directory holding the volumes (created if missing).
    #[arg(long, env = "FERROVOL_DATA")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7700", env = "FERROVOL_LISTEN")]
    listen: SocketAddr,
    /// File holding the admin token (or FERROVOL_ADMIN_TOKEN): the credential that may act for any
    /// node (the CSI controller). Secrets never go on the command line.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// File holding the join token (or FERROVOL_JOIN_TOKEN): lets a node that is not enrolled yet
    /// enroll and get a credential of its own. With neither token, any client may claim any node
    /// id (loopback and tests only).
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// TLS: the server's certificate chain (PEM). With it (and --tls-key) the port speaks only TLS;
    /// plaintext clients get a clear error.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS: the server's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TLS: require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Seconds a new connection has to complete the handshake.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_s: u64,
    /// Microseconds a connection polls for its next request before its thread sleeps, when its recent
    /// requests came at most that far apart (an idle connection does not poll): trades CPU for the
    /// latency of a thread wakeup. 0 disables.
    #[arg(long, default_value_t = 300)]
    poll_us: u64,
    /// Connection threads (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Pace of the background copies of snapshots and clones, in MiB/s (0 = unlimited), where the
    /// data dir cannot reflink: bounds what a copy takes from the volumes' own I/O.
    #[arg(long, default_value_t = 0)]
    copy_mib_per_s: u64,
    /// Serve Prometheus metrics on this address (`/metrics`; also `/healthz`, and `/readyz` once
    /// the data dir is open and the port listens), e.g. 127.0.0.1:9700. Off when not given.
    #[arg(long, env = "FERROVOL_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    // This runtime only accepts connections and waits for signals; connections run on their own
    // threads (see `Server::run`).
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovol-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let mut config = ServerConfig::new(&args.data, args.listen);
        config.auth = ferrovol_server::Auth {
            admin_token: ferrovol_proto::secret::read_server_token(
                "admin token",
                args.admin_token_file.as_deref(),
                "FERROVOL_ADMIN_TOKEN",
            )?,
            join_token: ferrovol_proto::secret::read_server_token(
                "join token",
                args.join_token_file.as_deref(),
                "FERROVOL_JOIN_TOKEN",
            )?,
        };
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            config.tls = Some(ferrovol_proto::tls::server_config(cert, key, args.tls_client_ca.as_deref())?);
        }
        if config.auth.is_open() && !args.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %args.listen,
                "no admin or join token: any client may act as any node (give --admin-token-file and \
                 --join-token-file, or listen on loopback only)"
            );
        }
        config.handshake_timeout = std::time::Duration::from_secs(args.handshake_timeout_s.max(1));
        config.poll = std::time::Duration::from_micros(args.poll_us.min(10_000));
        config.copy_bytes_per_s = args.copy_mib_per_s.saturating_mul(1 << 20);
        if let Some(n) = args.threads {
            config.workers = n.clamp(1, 256);
        }
        // The endpoint answers /healthz while the data dir opens (many volumes take a while);
        // /readyz once the server listens.
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store_cell =
            std::sync::Arc::new(std::sync::OnceLock::<std::sync::Arc<ferrovol_server::store::Store>>::new());
        let _metrics = match &args.metrics_listen {
            Some(addr) => {
                let mut registry = prometheus_client::registry::Registry::default();
                ferrovol_server::metrics::metrics().register(&mut registry);
                let cell = store_cell.clone();
                let endpoint = ferrovol_proto::metrics::Endpoint::new(registry, ready.clone(), move || {
                    if let Some(store) = cell.get() {
                        ferrovol_server::metrics::refresh_store(store);
                    }
                });
                let (bound, serving) =
                    ferrovol_proto::metrics::start(addr, std::sync::Arc::new(endpoint)).await?;
                info!(%bound, "metrics endpoint listening");
                Some((bound, serving))
            }
            None => None,
        };
        let server = Server::bind(config).await?;
        let _ = store_cell.set(server.store());
        ready.store(true, std::sync::atomic::Ordering::Release);
        let addr = server.local_addr()?;
        info!(%addr, data = %args.data.display(), "ferrovol-server listening");
        // Scripts and tests read this line to learn the port when listening on port 0.
        println!("listening on {addr}");
        if let Some((bound, _)) = &_metrics {
            // After the line above, which scripts read first; for port 0 too.
            println!("metrics on {bound}");
        }
        // Not ready from the moment the shutdown begins (the grace period answers what is in flight).
        let stopping = async {
            shutdown_signal().await;
            ready.store(false, std::sync::atomic::Ordering::Release);
        };
        server.run(stopping).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("ferrovol-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
