//! `ferrovol`: the client CLI.

mod bench;
mod cli;

/// jemalloc keeps freed large buffers for reuse instead of returning them to the kernel at once: with
/// glibc, every 1 MiB frame buffer came back as fresh pages (256 page faults and a zero-fill per MiB),
/// which halved large-block throughput at queue depth > 1.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(cli.global.log_format);
    // Attach drives its own threads (FUSE) and runtime; detach needs none.
    let blocking = match &cli.command {
        cli::Command::Attach { name, path, read_only, background, force_takeover, generation } => {
            Some(cli::attach::attach(
                &cli.global,
                name,
                path,
                *read_only,
                *background,
                *force_takeover,
                *generation,
            ))
        }
        cli::Command::Attachd { socket, keeper } => {
            Some(cli::attachd::attachd(cli.global.clone(), socket, keeper.clone()))
        }
        cli::Command::Keeper { socket, orphan_timeout_s } => {
            Some(cli::attachd::keeper(socket, std::time::Duration::from_secs(*orphan_timeout_s)))
        }
        cli::Command::Detach { path } => Some(cli::attach::detach(path)),
        cli::Command::Mount { name, dir, read_only, background, attr_ttl_ms, entry_ttl_ms, sync_writes } => {
            let ttl = ferrovol_client::fuse::files::Ttls {
                attr: std::time::Duration::from_millis(*attr_ttl_ms),
                entry: std::time::Duration::from_millis(*entry_ttl_ms),
            };
            let opts = cli::mount::MountOptions {
                read_only: *read_only,
                background: *background,
                ttl,
                sync_writes: *sync_writes,
            };
            Some(cli::mount::mount(&cli.global, name, dir, opts))
        }
        cli::Command::Umount { dir } => Some(cli::mount::umount(dir)),
        cli::Command::Up { data, mount, size, volume, kind } => {
            Some(cli::up::up(data, mount, *size, volume, matches!(kind, cli::VolumeKind::Fs)))
        }
        _ => None,
    };
    if let Some(result) = blocking {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferrovol: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // One thread: the CLI drives one session, and keeping its tasks (callers, the reader, the
    // supervisor) on one thread avoids cross-thread wakeups, which cost more than a 4 KiB round trip.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovol: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovol: {e:#}");
            ExitCode::FAILURE
        }
    }
}
