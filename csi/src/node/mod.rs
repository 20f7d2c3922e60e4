//! Node: stage (`stage.rs`: FUSE attach in a long-lived process of its own, loop device, mkfs on
//! first use, mount at the staging path), publish (`publish.rs`: bind mount into the pod, or the
//! loop device node for raw block), expansion and stats (`expand.rs`), and the reverse, each
//! idempotent and safe to re-run after a crash of this plugin: every step checks the kernel's state
//! (mount table, loop devices) and the on-disk record before acting.
//!
//! Never deletes through a live mount: a path is removed only once the mount table no longer lists it,
//! and only with a non-recursive removal. A path answering ENOTCONN or EIO is a broken mount, still
//! mounted, never "gone".
//!
//! Each handler is an inherent method returning [`CsiResult`]; the `Node` impl at the bottom only
//! logs (`rpc::logged`) and converts.

mod expand;
mod publish;
mod stage;
pub mod sys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ferrovol_proto::csi::node_server::Node;
use ferrovol_proto::csi::node_service_capability::{rpc, Rpc, Type as CapType};
use ferrovol_proto::csi::{self as pb, NodeServiceCapability};
use ferrovol_proto::VolumeName;
use tonic::{Request, Response, Status};
use tracing::info;

pub use self::sys::has_capability;
use crate::error::{CsiError, CsiResult};
use crate::locks::VolumeLocks;
use crate::state::{Staged, StateDir};
use crate::validate::{check_capability_of, path_of, require, volume_id, FsType, Kind, PARAM_FS_TYPE};
use crate::{Config, ServerLink, TOPOLOGY_KEY};

/// The hidden subcommand of `ferrovol-csi` that serves one attached volume.
pub const ATTACH_SUBCOMMAND: &str = "__attach";
/// The hidden subcommand of `ferrovol-csi` that serves one mounted fs volume.
pub const MOUNT_SUBCOMMAND: &str = "__mount";

/// The server, the node's credentials and TLS files, for a process of this binary.
fn server_args(cmd: &mut Command, c: &Config) {
    cmd.args(["--server", &c.server, "--node-id", c.node_id.as_str()])
        .env("FERROVOL_TOKEN", &c.token)
        .env("FERROVOL_CREDENTIAL_FILE", &c.credential_file)
        .env_remove("FERROVOL_TLS_CA")
        .env_remove("FERROVOL_TLS_CERT")
        .env_remove("FERROVOL_TLS_KEY");
    if let Some(t) = &c.tls_files {
        cmd.env("FERROVOL_TLS_CA", &t.ca);
        if let Some((cert, key)) = &t.cert {
            cmd.env("FERROVOL_TLS_CERT", cert).env("FERROVOL_TLS_KEY", key);
        }
    }
}

/// The command of an fs volume's mount process (`ferrovol-csi __mount`, in the foreground; it
/// prints `ready` once mounted at `path`).
pub fn mount_command(exe: &Path, c: &Config, volume: &str, path: &Path, read_only: bool) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg(MOUNT_SUBCOMMAND);
    server_args(&mut cmd, c);
    cmd.args(["--io-timeout-s", &c.io_timeout.as_secs().to_string()])
        .args(["--volume", volume])
        .arg("--path")
        .arg(path);
    if read_only {
        cmd.arg("--read-only");
    }
    cmd
}

/// The command of a volume's attach process (`ferrovol-csi __attach`, in the foreground; it prints
/// `ready`): what this plugin starts itself, or what the attach daemon starts for it.
pub fn attach_command(exe: &Path, c: &Config, req: &ferrovol_client::attachd::AttachRequest) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg(ATTACH_SUBCOMMAND);
    server_args(&mut cmd, c);
    cmd.args(["--io-timeout-s", &req.io_timeout_s.unwrap_or(c.io_timeout.as_secs()).to_string()])
        .args(["--volume", &req.volume])
        .arg("--path")
        .arg(&req.path);
    if req.read_only {
        cmd.arg("--read-only");
    } else if let Some(g) = req.generation {
        cmd.args(["--generation", &g.to_string()]);
    }
    cmd
}

#[derive(Debug)]
struct Inner {
    config: Config,
    state: StateDir,
    exe: PathBuf,
    /// The most volumes staged at once (NodeGetInfo's `max_volumes_per_node`).
    volume_limit: i64,
}

impl Inner {
    fn save(&self, st: &Staged) -> CsiResult<()> {
        self.state.save(st).map_err(|e| CsiError::step("cannot record the staging state", e))
    }

    fn load(&self, id: &str) -> CsiResult<Option<Staged>> {
        self.state.load(id).map_err(|e| CsiError::step("cannot read the staging state", e))
    }
}

#[derive(Debug)]
pub struct NodeService {
    inner: Arc<Inner>,
    link: Arc<ServerLink>,
    locks: VolumeLocks,
}

fn node_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability { r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })) }
}

impl NodeService {
    pub fn new(config: Config, link: Arc<ServerLink>, locks: VolumeLocks) -> anyhow::Result<Self> {
        let state = StateDir::open(&config.state_dir)
            .map_err(|e| anyhow::anyhow!("cannot use the state dir {}: {e}", config.state_dir.display()))?;
        let exe =
            std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find our own executable: {e}"))?;
        let volume_limit = if config.max_volumes_per_node > 0 {
            config.max_volumes_per_node
        } else {
            sys::default_volume_limit()
        };
        Ok(Self { inner: Arc::new(Inner { config, state, exe, volume_limit }), link, locks })
    }

    /// Runs a blocking node operation off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> CsiResult<T> + Send + 'static,
    ) -> CsiResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| CsiError::internal(format!("node operation panicked: {e}")))?
    }

    async fn session(&self) -> CsiResult<ferrovol_client::Session> {
        self.link.session().await.map_err(|s| CsiError::Unavailable(s.message().to_owned()))
    }

    /// Spec: a missing volume: NOT_FOUND; `volume_capability` and `staging_target_path` are
    /// REQUIRED (INVALID_ARGUMENT); staged incompatibly: ALREADY_EXISTS (see `stage.rs`).
    async fn stage(&self, req: pb::NodeStageVolumeRequest) -> CsiResult<pb::NodeStageVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let staging = path_of(&req.staging_target_path, "staging_target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability is required"))?;
        // A mount capability without fs_type takes the StorageClass's fsType (volume_context).
        let default_fs =
            req.volume_context.get(PARAM_FS_TYPE).and_then(|f| FsType::parse(f)).unwrap_or(FsType::Ext4);
        let name = volume_id(&req.volume_id)?;
        let _guard = self.locks.try_lock(name.as_str())?;
        // A volume the server does not know is NOT_FOUND, before anything is set up; its kind
        // comes from the server (or the record of an earlier stage).
        let kind = match self.inner.load(name.as_str())? {
            Some(st) if st.fs => Kind::Fs,
            Some(_) => Kind::Block,
            None => Kind::of(&self.session().await?.stat_volume(&name).await?),
        };
        let access = check_capability_of(cap, kind, default_fs).map_err(CsiError::InvalidArgument)?;
        let read_only =
            access.reader_only || req.publish_context.get("readonly").is_some_and(|v| v == "true");
        // A read-write stage runs under the generation ControllerPublish set (fenced once another
        // publish takes over); without one (no attacher), the attach process takes the attachment.
        let generation = match req.publish_context.get("generation") {
            Some(g) if !read_only => Some(g.parse::<u64>().map_err(|_| {
                CsiError::invalid(format!("publish_context generation {g:?} is not a number"))
            })?),
            _ => None,
        };
        let id = name.to_string();
        self.blocking(move |n| n.stage(&id, staging, access, read_only, generation)).await?;
        Ok(pb::NodeStageVolumeResponse {})
    }

    async fn unstage(&self, req: pb::NodeUnstageVolumeRequest) -> CsiResult<pb::NodeUnstageVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let staging = path_of(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.locks.try_lock(&req.volume_id)?;
        match VolumeName::try_from(req.volume_id.as_str()) {
            Ok(n) => {
                let id = n.to_string();
                self.blocking(move |n| n.unstage(&id, &staging)).await?;
            }
            // Not a ferrovol name: never staged by us; only make sure nothing stays mounted there.
            Err(_) => {
                self.blocking(
                    move |_| if sys::is_mounted(&staging) { sys::unmount_now(&staging) } else { Ok(()) },
                )
                .await?
            }
        }
        Ok(pb::NodeUnstageVolumeResponse {})
    }

    async fn publish(&self, req: pb::NodePublishVolumeRequest) -> CsiResult<pb::NodePublishVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let staging = path_of(&req.staging_target_path, "staging_target_path")?;
        let target = path_of(&req.target_path, "target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability is required"))?;
        let name = volume_id(&req.volume_id)?;
        let _guard = self.locks.try_lock(name.as_str())?;
        let kind = match self.inner.load(name.as_str())? {
            Some(st) if st.fs => Kind::Fs,
            _ => Kind::Block,
        };
        let access = check_capability_of(cap, kind, FsType::Ext4).map_err(CsiError::InvalidArgument)?;
        let read_only = req.readonly || access.reader_only;
        // podInfoOnMount: who the volume is published for, for the logs.
        let pod =
            |k: &str| req.volume_context.get(&format!("csi.storage.k8s.io/{k}")).cloned().unwrap_or_default();
        info!(volume = %name, pod = %pod("pod.name"), namespace = %pod("pod.namespace"), "publishing");
        let id = name.to_string();
        self.blocking(move |n| n.publish(&id, &staging, target, &access, read_only)).await?;
        Ok(pb::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: pb::NodeUnpublishVolumeRequest,
    ) -> CsiResult<pb::NodeUnpublishVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let target = path_of(&req.target_path, "target_path")?;
        let _guard = self.locks.try_lock(&req.volume_id)?;
        let id = req.volume_id.clone();
        self.blocking(move |n| n.unpublish(&id, &target)).await?;
        Ok(pb::NodeUnpublishVolumeResponse {})
    }

    async fn volume_stats(
        &self,
        req: pb::NodeGetVolumeStatsRequest,
    ) -> CsiResult<pb::NodeGetVolumeStatsResponse> {
        let name = volume_id(&req.volume_id)?;
        let id = name.to_string();
        self.blocking(move |n| {
            let (st, path) = n.lookup(&id, &req.volume_path, "volume_path")?;
            n.stats(&st, &path)
        })
        .await
    }

    async fn expand(&self, req: pb::NodeExpandVolumeRequest) -> CsiResult<pb::NodeExpandVolumeResponse> {
        let name = volume_id(&req.volume_id)?;
        if let Some(cap) = &req.volume_capability {
            let kind = match self.inner.load(name.as_str())? {
                Some(st) if st.fs => Kind::Fs,
                _ => Kind::Block,
            };
            check_capability_of(cap, kind, FsType::Ext4).map_err(CsiError::InvalidArgument)?;
        }
        let required = req.capacity_range.as_ref().map_or(0, |r| r.required_bytes.max(0).unsigned_abs());
        let _guard = self.locks.try_lock(name.as_str())?;
        let id = name.to_string();
        let size = self
            .blocking(move |n| {
                let (st, _) = n.lookup(&id, &req.volume_path, "volume_path")?;
                n.expand(&st, required)
            })
            .await?;
        Ok(pb::NodeExpandVolumeResponse { capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX) })
    }

    fn capabilities() -> pb::NodeGetCapabilitiesResponse {
        use rpc::Type::*;
        let capabilities =
            [StageUnstageVolume, GetVolumeStats, ExpandVolume, VolumeCondition, SingleNodeMultiWriter]
                .into_iter()
                .map(node_cap)
                .collect();
        pb::NodeGetCapabilitiesResponse { capabilities }
    }

    /// Registering here (kubelet calls this when it registers the plugin) makes the node known to
    /// the server, so the controller can tell real nodes from typos in ControllerPublishVolume.
    /// `max_volumes_per_node`: the scheduler places no more pods with ferrovol volumes here; a stage
    /// beyond it anyway gets RESOURCE_EXHAUSTED.
    async fn info(&self) -> CsiResult<pb::NodeGetInfoResponse> {
        let session = self.session().await?;
        session.register_node(&self.inner.config.node_id).await?;
        let server_id = session.server_info().server_id.clone();
        Ok(pb::NodeGetInfoResponse {
            node_id: self.inner.config.node_id.to_string(),
            max_volumes_per_node: self.inner.volume_limit,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), server_id)]),
            }),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        r: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("NodeStageVolume", r.volume_id.clone(), self.stage(r))
    }
    async fn node_unstage_volume(
        &self,
        r: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("NodeUnstageVolume", r.volume_id.clone(), self.unstage(r))
    }
    async fn node_publish_volume(
        &self,
        r: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("NodePublishVolume", r.volume_id.clone(), self.publish(r))
    }
    async fn node_unpublish_volume(
        &self,
        r: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("NodeUnpublishVolume", r.volume_id.clone(), self.unpublish(r))
    }
    async fn node_get_volume_stats(
        &self,
        r: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("NodeGetVolumeStats", r.volume_id.clone(), self.volume_stats(r))
    }
    async fn node_expand_volume(
        &self,
        r: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("NodeExpandVolume", r.volume_id.clone(), self.expand(r))
    }
    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        crate::serve!("NodeGetCapabilities", String::new(), async { CsiResult::Ok(Self::capabilities()) })
    }
    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        crate::serve!("NodeGetInfo", String::new(), self.info())
    }
}
