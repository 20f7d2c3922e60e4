//! `ferrovol attachd` (the node attach daemon: `ferrovol_client::attachd`) and `ferrovol keeper`
//! (the second holder of every mount's FUSE fds: `ferrovol_client::fuse::keep`). See
//! client/README.md ("Continuity") for how the pieces fit.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use ferrovol_client::attachd::{self, AttachRequest, DaemonConfig};
use ferrovol_client::fuse::keep;
use tracing::info;

use super::Global;

/// `ferrovol keeper --socket PATH`: holds the deposited fds until the process ends.
pub fn keeper(socket: &Path, orphan_timeout: std::time::Duration) -> anyhow::Result<()> {
    let bound = keep::bind_socket(socket, "keeper")?;
    info!(socket = %socket.display(), ?orphan_timeout, "keeper listening");
    eprintln!("ferrovol keeper: holding the FUSE fds of this node's mounts; socket {}", socket.display());
    keep::serve(bound, orphan_timeout)?;
    Ok(())
}

/// `ferrovol attachd --socket PATH [--keeper PATH]`: each mount is a `ferrovol attach` with the
/// daemon's own global flags.
pub fn attachd(global: Global, socket: &Path, keeper: Option<PathBuf>) -> anyhow::Result<()> {
    // The holders it starts must find the credentials it was given: check them now, once.
    let options = global.options().context("the attach daemon's connection options")?;
    let exe = std::env::current_exe().context("cannot find the ferrovol executable")?;
    let log_dir = socket.parent().unwrap_or(Path::new("/run/ferrovol")).join("attachd");
    eprintln!(
        "ferrovol attachd: socket {}{}; {} mount(s) served on this node",
        socket.display(),
        keeper.as_ref().map_or(String::new(), |k| format!(", keeper {}", k.display())),
        ferrovol_client::host::servings().len()
    );
    let config = DaemonConfig {
        socket: socket.to_owned(),
        keeper,
        log_dir,
        node_id: options.node_id.to_string(),
        server: global.server.clone(),
        version: super::VERSION.clone(),
        holder: Box::new(move |a: &AttachRequest| {
            let mut cmd = Command::new(&exe);
            cmd.args(global_args(&global, a.io_timeout_s)).arg("attach").arg(&a.volume).arg(&a.path);
            if a.read_only {
                cmd.arg("--read-only");
            } else if let Some(g) = a.generation {
                cmd.args(["--generation", &g.to_string()]);
            }
            Ok(super::attach::notifying(cmd, a.log.as_deref()))
        }),
    };
    attachd::serve(config)?;
    Ok(())
}

/// The global flags the daemon was started with, for the holders it starts.
fn global_args(g: &Global, io_timeout_s: Option<u64>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--server".into(), g.server.clone().into()];
    args.extend(["--io-timeout-s".into(), io_timeout_s.unwrap_or(g.io_timeout_s).to_string().into()]);
    let paths = [
        ("--token-file", &g.token_file),
        ("--credential-file", &g.credential_file),
        ("--tls-ca", &g.tls_ca),
        ("--tls-cert", &g.tls_cert),
        ("--tls-key", &g.tls_key),
    ];
    for (flag, p) in paths {
        if let Some(p) = p {
            args.extend([flag.into(), p.clone().into_os_string()]);
        }
    }
    if let Some(n) = &g.node_id {
        args.extend(["--node-id".into(), n.as_str().into()]);
    }
    let format = match g.log_format {
        super::LogFormat::Text => "text",
        super::LogFormat::Json => "json",
    };
    args.extend(["--log-format".into(), format.into()]);
    args
}
