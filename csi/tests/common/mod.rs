//! The harness of the CSI tests: a `ferrovol-csi` process and gRPC clients on its unix socket, as
//! kubelet and the sidecars talk to it, plus request builders.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrovol_proto::csi::controller_client::ControllerClient;
use ferrovol_proto::csi::identity_client::IdentityClient;
use ferrovol_proto::csi::node_client::NodeClient;
use ferrovol_proto::csi::volume_capability::access_mode::Mode;
use ferrovol_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use ferrovol_proto::csi::*;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

/// One ferrovol-csi process and gRPC clients on its socket.
pub struct Plugin {
    child: Option<Child>,
    pub socket: PathBuf,
    token: String,
    args: Vec<String>,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

pub async fn connect(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

impl Plugin {
    pub async fn start(dir: &Path, server: &str, node_id: &str, mode: &str) -> Plugin {
        Self::start_with_token(dir, server, node_id, mode, "tok", &format!("state-{node_id}")).await
    }

    /// With `token` as FERROVOL_TOKEN and `state` (under `dir`) as its state dir.
    pub async fn start_with_token(
        dir: &Path,
        server: &str,
        node_id: &str,
        mode: &str,
        token: &str,
        state: &str,
    ) -> Plugin {
        let socket = dir.join(format!("csi-{node_id}-{mode}-{state}.sock"));
        let args = plugin_args(&socket, dir, server, node_id, mode, state, &["--io-timeout-s", "10"]);
        Self::spawn(socket, args, token.to_owned()).await
    }

    /// A controller whose log goes to `log`.
    pub async fn start_logging(dir: &Path, server: &str, log: &Path) -> Plugin {
        let socket = dir.join("csi-logged.sock");
        let args = plugin_args(&socket, dir, server, "ctl", "controller", "state-logged", &[]);
        Self::spawn_logging(socket, args, "tok".into(), Some(log)).await
    }

    /// With extra command-line arguments.
    pub async fn start_with_args(
        dir: &Path,
        server: &str,
        node_id: &str,
        mode: &str,
        extra: &[&str],
    ) -> Plugin {
        let socket = dir.join(format!("csi-{node_id}-{mode}-extra.sock"));
        let args = plugin_args(&socket, dir, server, node_id, mode, &format!("state-{node_id}"), extra);
        Self::spawn(socket, args, "tok".into()).await
    }

    pub async fn spawn(socket: PathBuf, args: Vec<String>, token: String) -> Plugin {
        Self::spawn_logging(socket, args, token, None).await
    }

    /// With its log (stderr, RUST_LOG=info, JSON lines) written to `log` when given.
    pub async fn spawn_logging(
        socket: PathBuf,
        args: Vec<String>,
        token: String,
        log: Option<&Path>,
    ) -> Plugin {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovol-csi"));
        cmd.args(&args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .env("FERROVOL_TOKEN", &token)
            .stdin(Stdio::null());
        if let Some(log) = log {
            cmd.args(["--log-format", "json"])
                .env("RUST_LOG", "info")
                .stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            assert!(Instant::now() < deadline, "ferrovol-csi did not listen on {}", socket.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ch = connect(&socket).await;
        Plugin {
            child: Some(child),
            socket,
            token,
            args,
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        }
    }

    /// NodeUnpublish of `target`, then NodeUnstage of `staging`; both must succeed.
    pub async fn unpublish_unstage(&mut self, id: &str, target: &Path, staging: &Path) {
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
    }

    /// kill -9 and start again with the same arguments.
    pub async fn restart_hard(mut self) -> Plugin {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        Self::spawn(self.socket.clone(), std::mem::take(&mut self.args), std::mem::take(&mut self.token))
            .await
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The command line of a plugin on `socket`, with its state dir `state` under `dir`.
fn plugin_args(
    socket: &Path,
    dir: &Path,
    server: &str,
    node_id: &str,
    mode: &str,
    state: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--endpoint".into(),
        format!("unix://{}", socket.display()),
        "--node-id".into(),
        node_id.into(),
        "--mode".into(),
        mode.into(),
        "--server".into(),
        server.into(),
        "--state-dir".into(),
        dir.join(state).display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

/// Dropped before the temp dir: takes down whatever a failed test left mounted under it (deepest
/// first), its loop devices and attach processes, so the temp dir's removal never walks into a live
/// mount.
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let root = self.0.to_string_lossy().into_owned();
        let mounts = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
                .filter(|m| m.starts_with(&root))
                .collect();
            v.sort_by_key(|m| std::cmp::Reverse(m.len()));
            v
        };
        for _ in 0..3 {
            for m in mounts() {
                let _ = Command::new("umount").arg(&m).output();
            }
            if let Ok(out) = Command::new("losetup").arg("-a").output() {
                for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&root)) {
                    if let Some(dev) = line.split(':').next() {
                        let _ = ferrovol_client::host::loop_release(dev);
                    }
                }
            }
        }
        let _ = Command::new("pkill").args(["-f", &format!("__attach .*{root}")]).output();
        if !mounts().is_empty() {
            // Leave the directory behind rather than delete through a mount.
            eprintln!("mounts left under {root}: {:?}", mounts());
            std::process::abort();
        }
    }
}

pub fn cap(block: bool, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                mount_flags: vec!["noatime".into()],
                ..Default::default()
            })
        }),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn create_req(name: &str, bytes: i64, block: bool) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap(block, Mode::SingleNodeWriter)],
        parameters: HashMap::from([("fsType".into(), "ext4".into())]),
        ..Default::default()
    }
}

pub fn inv<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    match r {
        Err(e) if e.code() == Code::InvalidArgument => {}
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

pub fn is_mounted(path: &Path) -> bool {
    ferrovol_client::host::mount_at(path).is_some()
}

/// kubelet's NodeStage (at `staging`) and NodePublish (at `target`) requests for `id`.
pub fn node_reqs(
    id: &str,
    ctx: &HashMap<String, String>,
    c: &VolumeCapability,
    staging: &Path,
    target: &Path,
) -> (NodeStageVolumeRequest, NodePublishVolumeRequest) {
    let stage = NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    let publish = NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    (stage, publish)
}
