//! Controller: provisioning (CreateVolume/DeleteVolume/expansion, from a snapshot or a volume),
//! snapshots, and attachment with single-writer fencing (ControllerPublish sets the server's writer
//! attachment to the node; no other node can write until ControllerUnpublish clears it). Everything
//! lives on the ferrovol server, so any replica of the controller can answer any call: nothing is
//! kept here.
//!
//! Each handler is an inherent method returning [`CsiResult`]; the `Controller` impl at the bottom
//! only logs (`rpc::logged`) and converts. The spec's MUSTs each handler implements are quoted above
//! it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrovol_proto::csi::controller_server::Controller;
use ferrovol_proto::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use ferrovol_proto::csi::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource as CsiVolumeSource,
};
use ferrovol_proto::csi::{self as pb, ControllerServiceCapability, VolumeContentSource};
use ferrovol_proto::limits::{VOLUME_SIZE_ALIGN, VOLUME_SIZE_MAX};
use ferrovol_proto::{Labels, SnapshotInfo, Status as Wire, VolumeInfo, VolumeName, VolumeSource};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::error::{CsiError, CsiResult};
use crate::locks::VolumeLocks;
use crate::names::volume_name_for;
pub use crate::validate::*;
use crate::{ServerLink, TOPOLOGY_KEY};

/// Volume and snapshot labels the controller sets: the CSI name the object was created for, the
/// StorageClass's fsType, and a volume's content source ("snapshot:ID" or "volume:ID").
pub const LABEL_CSI_NAME: &str = "csi.ferrovol.io/name";
pub const LABEL_FS_TYPE: &str = "csi.ferrovol.io/fstype";
pub const LABEL_SOURCE: &str = "csi.ferrovol.io/source";
/// The StorageClass's `type` as asked (`fs`, `block` or `auto`), when given.
pub const LABEL_TYPE: &str = "csi.ferrovol.io/type";
/// How long CreateVolume from a snapshot waits for the snapshot's copy to finish before ABORTED
/// (the CO retries).
const SNAPSHOT_READY_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct ControllerService {
    link: Arc<ServerLink>,
    locks: VolumeLocks,
}

/// The gRPC status for a failed server call (the one mapping lives in `error.rs`).
pub fn status_of(e: &ferrovol_client::ClientError) -> Status {
    CsiError::from(e).into()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability { r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })) }
}

/// What NodeStage needs to know that the capability may not say (the StorageClass's fsType, and
/// the volume's kind).
fn volume_context(info: &VolumeInfo) -> HashMap<String, String> {
    let mut c: HashMap<String, String> =
        info.labels.get(LABEL_FS_TYPE).map(|fs| (PARAM_FS_TYPE.to_owned(), fs.clone())).into_iter().collect();
    c.insert(PARAM_TYPE.to_owned(), Kind::of(info).as_str().to_owned());
    c
}

/// The content source a volume was created from, as its label records it.
fn content_source_of(info: &VolumeInfo) -> Option<VolumeContentSource> {
    let label = info.labels.get(LABEL_SOURCE)?;
    let r#type = match label.split_once(':')? {
        ("snapshot", id) => SourceType::Snapshot(SnapshotSource { snapshot_id: id.to_owned() }),
        ("volume", id) => SourceType::Volume(CsiVolumeSource { volume_id: id.to_owned() }),
        _ => return None,
    };
    Some(VolumeContentSource { r#type: Some(r#type) })
}

fn csi_snapshot(s: &SnapshotInfo) -> pb::Snapshot {
    let ms = s.created_unix_ms;
    pb::Snapshot {
        size_bytes: to_i64(s.size),
        snapshot_id: s.name.to_string(),
        source_volume_id: s.source.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from(ms % 1000 * 1_000_000).unwrap_or(0),
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

impl ControllerService {
    pub fn new(link: Arc<ServerLink>, locks: VolumeLocks) -> Self {
        Self { link, locks }
    }

    async fn session(&self) -> CsiResult<ferrovol_client::Session> {
        self.link.session().await.map_err(|s| CsiError::Unavailable(s.message().to_owned()))
    }

    async fn topology(&self) -> CsiResult<Vec<pb::Topology>> {
        let id = self.session().await?.server_info().server_id.clone();
        Ok(vec![pb::Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), id)]) }])
    }

    async fn volume(&self, info: &VolumeInfo) -> CsiResult<pb::Volume> {
        Ok(pb::Volume {
            capacity_bytes: to_i64(info.size),
            volume_id: info.name.to_string(),
            volume_context: volume_context(info),
            content_source: content_source_of(info),
            accessible_topology: self.topology().await?,
        })
    }

    /// Spec: "If a volume corresponding to the specified volume `name` already exists, is accessible
    /// from `accessibility_requirements`, and is compatible with the specified `capacity_range`,
    /// `volume_capabilities`, `parameters` and `volume_content_source` fields in this
    /// `CreateVolumeRequest`, the Plugin MUST reply 0 OK"; otherwise ALREADY_EXISTS. "If specified
    /// [the capacity range] MUST always be honored, even when creating volumes from a source."
    /// A missing source is NOT_FOUND; a source larger than the range allows, OUT_OF_RANGE.
    async fn create_volume(&self, req: pb::CreateVolumeRequest) -> CsiResult<pb::CreateVolumeResponse> {
        require(&req.name, "name")?;
        check_parameters(&req.parameters)?;
        let mut kind = kind_for(&req.parameters, &req.volume_capabilities)?;
        let auto = matches!(req.parameters.get(PARAM_TYPE).map(String::as_str), None | Some("auto"));
        let name = volume_name_for(&req.name);
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.session().await?;
        // The volume keeps its CSI name, parameters and source, so a retry is recognised as the same
        // request and a different request that maps to the same volume is not.
        let mut labels = Labels::from([(LABEL_CSI_NAME.to_owned(), req.name.clone())]);
        if let Some(fs) = req.parameters.get(PARAM_FS_TYPE) {
            labels.insert(LABEL_FS_TYPE.to_owned(), fs.clone());
        }
        if let Some(t) = req.parameters.get(PARAM_TYPE) {
            labels.insert(LABEL_TYPE.to_owned(), t.clone());
        }
        let source = match req.volume_content_source.as_ref().map(|s| s.r#type.as_ref()) {
            None => None,
            Some(None) => {
                return Err(CsiError::invalid("volume_content_source names neither a snapshot nor a volume"))
            }
            Some(Some(SourceType::Snapshot(s))) => {
                let id = snapshot_id(&s.snapshot_id)?;
                labels.insert(LABEL_SOURCE.to_owned(), format!("snapshot:{id}"));
                Some(VolumeSource::Snapshot(id))
            }
            Some(Some(SourceType::Volume(v))) => {
                let id = volume_id(&v.volume_id)?;
                labels.insert(LABEL_SOURCE.to_owned(), format!("volume:{id}"));
                Some(VolumeSource::Volume(id))
            }
        };
        ferrovol_proto::validate_labels(&labels).map_err(|_| {
            CsiError::invalid(format!("name is {} bytes; at most 1024 are kept", req.name.len()))
        })?;
        // type auto with a content source: the source's kind (a restore or clone is of its kind).
        if let (true, Some(src)) = (auto, &source) {
            kind = match self.source_kind(&session, src).await {
                Ok(k) => k,
                // A retry after the source was deleted: the volume made then tells.
                Err(e) => match session.stat_volume(&name).await {
                    Ok(v) => Kind::of(&v),
                    Err(_) => return Err(e),
                },
            };
        }
        check_capabilities(&req.volume_capabilities, kind)?;
        let matches = |v: &VolumeInfo| -> CsiResult<()> {
            if Kind::of(v) != kind {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} exists as an {} volume; this request asks for {}",
                    Kind::of(v).as_str(),
                    kind.as_str()
                )));
            }
            if v.labels != labels {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} exists for another request (CSI name {:?}, parameters {:?}, source {:?})",
                    v.labels
                        .get(LABEL_CSI_NAME)
                        .map(String::as_str)
                        .unwrap_or("none: not made by ferrovol-csi"),
                    v.labels.get(LABEL_FS_TYPE),
                    v.labels.get(LABEL_SOURCE),
                )));
            }
            if !fits(v.size, req.capacity_range.as_ref()) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists as {name} with {} bytes, outside the requested capacity range",
                    req.name, v.size
                )));
            }
            Ok(())
        };
        let info = match session.stat_volume(&name).await {
            Ok(existing) => {
                matches(&existing)?;
                existing
            }
            Err(e) if e.status() == Some(Wire::NotFound) => {
                let size = match &source {
                    None => size_for(req.capacity_range.as_ref())?,
                    Some(src) => {
                        size_from_source(req.capacity_range.as_ref(), self.source_size(&session, src).await?)?
                    }
                };
                let created = match kind {
                    Kind::Block => {
                        session.create_volume_from(&name, size, labels.clone(), source.clone()).await
                    }
                    Kind::Fs => {
                        let fs = ferrovol_proto::codec::VOLUME_KIND_FS;
                        session.create_volume_of_kind(&name, fs, size, labels.clone(), source.clone()).await
                    }
                };
                match created {
                    Ok(v) => {
                        info!(csi_name = %req.name, volume = %name, size, source = ?source, "volume created");
                        v
                    }
                    // Created by a racing call between our STAT and CREATE: take it if it matches.
                    Err(e) if e.status() == Some(Wire::AlreadyExists) => {
                        let v = session.stat_volume(&name).await?;
                        matches(&v)?;
                        v
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        Ok(pb::CreateVolumeResponse { volume: Some(self.volume(&info).await?) })
    }

    /// The kind of a content source; NOT_FOUND when it does not exist.
    async fn source_kind(
        &self,
        session: &ferrovol_client::Session,
        source: &VolumeSource,
    ) -> CsiResult<Kind> {
        let fs = match source {
            VolumeSource::Volume(v) => session.stat_volume(v).await?.kind,
            VolumeSource::Snapshot(s) => session.stat_snapshot(s).await?.kind,
        } == ferrovol_proto::codec::VOLUME_KIND_FS;
        Ok(if fs { Kind::Fs } else { Kind::Block })
    }

    /// The size of a content source; NOT_FOUND when it does not exist. A snapshot still being copied
    /// is waited for (up to `SNAPSHOT_READY_WAIT`, then ABORTED: the CO retries).
    async fn source_size(&self, session: &ferrovol_client::Session, source: &VolumeSource) -> CsiResult<u64> {
        match source {
            VolumeSource::Volume(v) => Ok(session.stat_volume(v).await?.size),
            VolumeSource::Snapshot(s) => {
                let deadline = tokio::time::Instant::now() + SNAPSHOT_READY_WAIT;
                loop {
                    let info = session.stat_snapshot(s).await?;
                    if info.ready {
                        return Ok(info.size);
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(CsiError::Aborted(format!(
                            "snapshot {s} is not ready yet ({} of {} bytes copied); retry later",
                            info.copied_bytes, info.size
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Spec: "If a volume corresponding to the specified `volume_id` does not exist or the artifacts
    /// associated with the volume do not exist anymore, the Plugin MUST reply 0 OK."
    async fn delete_volume(&self, req: pb::DeleteVolumeRequest) -> CsiResult<pb::DeleteVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        // An id that is not a ferrovol name cannot exist: deleting it is done.
        let Ok(name) = VolumeName::try_from(req.volume_id.as_str()) else {
            return Ok(pb::DeleteVolumeResponse {});
        };
        let _guard = self.locks.try_lock(name.as_str())?;
        match self.session().await?.delete_volume(&name).await {
            Ok(()) => info!(volume = %name, "volume deleted"),
            Err(e) if e.status() == Some(Wire::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(pb::DeleteVolumeResponse {})
    }

    /// Spec: "If the volume corresponding to the `volume_id` has already been published at the node
    /// corresponding to the `node_id`, and is compatible with the specified `volume_capability` and
    /// `readonly` flag, the Plugin MUST reply 0 OK"; published there incompatibly: ALREADY_EXISTS;
    /// published for writing at another node while the mode allows one: FAILED_PRECONDITION.
    async fn controller_publish_volume(
        &self,
        req: pb::ControllerPublishVolumeRequest,
    ) -> CsiResult<pb::ControllerPublishVolumeResponse> {
        let name = volume_id(&req.volume_id)?;
        let node = node_id(&req.node_id)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability is required"))?;
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.session().await?;
        // The volume first (NOT_FOUND), then a writer elsewhere (FAILED_PRECONDITION, whatever the
        // node), then the node itself: only nodes whose plugin registered at kubelet's NodeGetInfo.
        let info = session.stat_volume(&name).await?;
        let kind = Kind::of(&info);
        let access = check_capability_of(cap, kind, FsType::Ext4).map_err(CsiError::InvalidArgument)?;
        let read_only = req.readonly || access.reader_only;
        match info.owner.as_ref() {
            Some(owner) if !read_only && *owner != node => {
                return Err(CsiError::precondition(format!(
                    "volume {name} is published for writing to node {owner}; unpublish it there first"
                )))
            }
            Some(owner) if read_only && *owner == node => {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} is already published read-write to node {node}; it cannot also be \
                     published read-only there (unpublish it first)"
                )))
            }
            _ => {}
        }
        session.stat_node(&node).await.map_err(|e| match e.status() {
            Some(Wire::NotFound) => CsiError::not_found(format!(
                "node {node} is not known to the ferrovol server (its node plugin never registered)"
            )),
            _ => e.into(),
        })?;
        let mut context = HashMap::from([("readonly".to_owned(), read_only.to_string())]);
        // Readers need no attachment; the node opens the volume read-only. Nor do the writers of
        // an fs volume: there are many, and the server arbitrates between them.
        if !read_only && kind == Kind::Block {
            let generation = session.attach_set(&name, &node, false).await.map_err(|e| match e.status() {
                Some(Wire::AttachedElsewhere) => CsiError::precondition(format!(
                    "volume {name} is published for writing to another node; unpublish it there first ({e})"
                )),
                _ => e.into(),
            })?;
            info!(volume = %name, node = %node, generation, "published for writing");
            context.insert("generation".to_owned(), generation.to_string());
        }
        Ok(pb::ControllerPublishVolumeResponse { publish_context: context })
    }

    /// Spec: "If the volume corresponding to the `volume_id` or the node corresponding to `node_id`
    /// cannot be found by the Plugin and the volume can be safely regarded as
    /// ControllerUnpublished from the node, the plugin SHOULD return 0 OK."
    async fn controller_unpublish_volume(
        &self,
        req: pb::ControllerUnpublishVolumeRequest,
    ) -> CsiResult<pb::ControllerUnpublishVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let Ok(name) = VolumeName::try_from(req.volume_id.as_str()) else {
            return Ok(pb::ControllerUnpublishVolumeResponse {});
        };
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.session().await?;
        let info = match session.stat_volume(&name).await {
            Ok(info) => info,
            Err(e) if e.status() == Some(Wire::NotFound) => {
                return Ok(pb::ControllerUnpublishVolumeResponse {})
            }
            Err(e) => return Err(e.into()),
        };
        // Without a node id: unpublish from every node (the writer is the only one we track).
        let target = if req.node_id.is_empty() {
            info.owner.clone()
        } else {
            ferrovol_proto::NodeId::try_from(req.node_id.as_str()).ok()
        };
        if let (Some(node), Some(owner)) = (target, info.owner.as_ref()) {
            if &node == owner {
                match session.attach_clear(&name, &node, 0).await {
                    Ok(()) => info!(volume = %name, node = %node, "unpublished"),
                    Err(e) if matches!(e.status(), Some(Wire::AttachedElsewhere) | Some(Wire::NotFound)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(pb::ControllerUnpublishVolumeResponse {})
    }

    /// Spec: "If a volume corresponding to the specified `volume_id` does not exist, the Plugin MUST
    /// reply NOT_FOUND"; unsupported capabilities are reported unconfirmed, with a message.
    async fn validate_volume_capabilities(
        &self,
        req: pb::ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<pb::ValidateVolumeCapabilitiesResponse> {
        let name = volume_id(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::invalid("volume_capabilities is required"));
        }
        let kind = Kind::of(&self.session().await?.stat_volume(&name).await?);
        let unconfirmed =
            |message: String| pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message };
        if let Err(e) = check_parameters(&req.parameters) {
            return Ok(unconfirmed(e.to_string()));
        }
        for cap in &req.volume_capabilities {
            if let Err(why) = check_capability_of(cap, kind, FsType::Ext4) {
                return Ok(unconfirmed(why));
            }
        }
        Ok(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    /// Spec: "If `starting_token` is not valid [...] the Plugin MUST return ABORTED"; `next_token`
    /// MUST be set when more entries follow.
    async fn list_volumes(&self, req: pb::ListVolumesRequest) -> CsiResult<pb::ListVolumesResponse> {
        let max = u32::try_from(req.max_entries)
            .map_err(|_| CsiError::invalid("max_entries must not be negative"))?;
        let start_after = parse_page_token("v", &req.starting_token)?;
        let session = self.session().await?;
        let max = if max == 0 { ferrovol_proto::limits::LIST_ENTRIES_MAX } else { max };
        let (page, more) = session.list_volumes_page(start_after.as_ref(), max).await?;
        let topology = self.topology().await?;
        let next_token = match page.last() {
            Some(last) if more => page_token("v", &last.name),
            _ => String::new(),
        };
        let entries = page
            .iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(pb::Volume {
                    capacity_bytes: to_i64(v.size),
                    volume_id: v.name.to_string(),
                    volume_context: volume_context(v),
                    content_source: content_source_of(v),
                    accessible_topology: topology.clone(),
                }),
                status: None,
            })
            .collect();
        Ok(pb::ListVolumesResponse { entries, next_token })
    }

    async fn get_capacity(&self, req: pb::GetCapacityRequest) -> CsiResult<pb::GetCapacityResponse> {
        let none = || pb::GetCapacityResponse { available_capacity: 0, ..Default::default() };
        check_parameters(&req.parameters)?;
        // The spec: capacity for capabilities we cannot serve is zero.
        let kind = kind_for(&req.parameters, &req.volume_capabilities)?;
        if req.volume_capabilities.iter().any(|cap| check_capability_of(cap, kind, FsType::Ext4).is_err()) {
            return Ok(none());
        }
        let session = self.session().await?;
        if let Some(t) = &req.accessible_topology {
            let ours = session.server_info().server_id.clone();
            if t.segments.get(TOPOLOGY_KEY).is_some_and(|v| *v != ours) {
                return Ok(none());
            }
        }
        let stat = session.store_stat().await?;
        let available = stat.free_bytes / VOLUME_SIZE_ALIGN * VOLUME_SIZE_ALIGN;
        Ok(pb::GetCapacityResponse {
            available_capacity: to_i64(available),
            // Volumes are sparse, so one may be larger than the free space; this is the protocol's cap.
            maximum_volume_size: Some(to_i64(VOLUME_SIZE_MAX)),
            minimum_volume_size: Some(to_i64(MIN_SIZE)),
        })
    }

    fn capabilities() -> pb::ControllerGetCapabilitiesResponse {
        use rpc::Type::*;
        let capabilities = [
            CreateDeleteVolume,
            PublishUnpublishVolume,
            ListVolumes,
            GetCapacity,
            CreateDeleteSnapshot,
            ListSnapshots,
            CloneVolume,
            PublishReadonly,
            ExpandVolume,
            GetVolume,
            SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(rpc_cap)
        .collect();
        pb::ControllerGetCapabilitiesResponse { capabilities }
    }

    /// Spec: ControllerExpandVolume of a volume already at least that large is OK (idempotent);
    /// a missing volume is NOT_FOUND; a size that cannot be honoured OUT_OF_RANGE.
    async fn controller_expand_volume(
        &self,
        req: pb::ControllerExpandVolumeRequest,
    ) -> CsiResult<pb::ControllerExpandVolumeResponse> {
        let name = volume_id(&req.volume_id)?;
        let range =
            req.capacity_range.as_ref().ok_or_else(|| CsiError::invalid("capacity_range is required"))?;
        let wanted = size_for(Some(range))?;
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.session().await?;
        let current = session.stat_volume(&name).await?;
        if let Some(cap) = &req.volume_capability {
            check_capability_of(cap, Kind::of(&current), FsType::Ext4).map_err(CsiError::InvalidArgument)?;
        }
        let info = if current.size >= wanted {
            if !fits(current.size, Some(range)) {
                return Err(CsiError::OutOfRange(format!(
                    "volume {name} is already {} bytes, above limit_bytes {} (volumes do not shrink)",
                    current.size, range.limit_bytes
                )));
            }
            current
        } else {
            let v = session.resize_volume(&name, wanted).await?;
            info!(volume = %name, from = current.size, to = v.size, "volume expanded");
            v
        };
        // The node refreshes its loop device (and grows the filesystem for mount volumes); an fs
        // volume grows on the server alone.
        Ok(pb::ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(info.size),
            node_expansion_required: Kind::of(&info) == Kind::Block,
        })
    }

    async fn controller_get_volume(
        &self,
        req: pb::ControllerGetVolumeRequest,
    ) -> CsiResult<pb::ControllerGetVolumeResponse> {
        let name = volume_id(&req.volume_id)?;
        let info = self.session().await?.stat_volume(&name).await?;
        let published_node_ids = info.owner.iter().map(|o| o.to_string()).collect();
        Ok(pb::ControllerGetVolumeResponse {
            volume: Some(self.volume(&info).await?),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(pb::VolumeCondition {
                    abnormal: false,
                    message: "reachable on the server".into(),
                }),
            }),
        })
    }

    /// Spec: "If a snapshot corresponding to the specified snapshot `name` is successfully cut and
    /// ready to use [...] the Plugin MUST reply 0 OK"; a snapshot of that name for another source:
    /// ALREADY_EXISTS; a missing source volume: NOT_FOUND. A cut snapshot whose copy still runs is
    /// answered with `ready_to_use` false; the CO calls again until it is true.
    async fn create_snapshot(&self, req: pb::CreateSnapshotRequest) -> CsiResult<pb::CreateSnapshotResponse> {
        require(&req.name, "name")?;
        require(&req.source_volume_id, "source_volume_id")?;
        check_snapshot_parameters(&req.parameters)?;
        let source = volume_id(&req.source_volume_id)?;
        let name = volume_name_for(&req.name);
        let _guard = self.locks.try_lock(&format!("snapshot:{name}"))?;
        let session = self.session().await?;
        let labels = Labels::from([(LABEL_CSI_NAME.to_owned(), req.name.clone())]);
        ferrovol_proto::validate_labels(&labels).map_err(|_| {
            CsiError::invalid(format!("name is {} bytes; at most 1024 are kept", req.name.len()))
        })?;
        let matches = |s: SnapshotInfo| -> CsiResult<SnapshotInfo> {
            if s.source != source || s.labels.get(LABEL_CSI_NAME) != Some(&req.name) {
                return Err(CsiError::AlreadyExists(format!(
                    "snapshot {:?} already exists, of volume {} (this request names volume {source})",
                    req.name, s.source
                )));
            }
            Ok(s)
        };
        let snap = match session.stat_snapshot(&name).await {
            Ok(existing) => matches(existing)?,
            Err(e) if e.status() == Some(Wire::NotFound) => {
                match session.create_snapshot(&name, &source, labels).await {
                    Ok(s) => {
                        info!(csi_name = %req.name, snapshot = %name, volume = %source, ready = s.ready, "snapshot created");
                        s
                    }
                    Err(e) if e.status() == Some(Wire::AlreadyExists) => {
                        matches(session.stat_snapshot(&name).await?)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        Ok(pb::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&snap)) })
    }

    /// Spec: "If a snapshot corresponding to the specified `snapshot_id` does not exist or the
    /// artifacts associated with the snapshot do not exist anymore, the Plugin MUST reply 0 OK."
    async fn delete_snapshot(&self, req: pb::DeleteSnapshotRequest) -> CsiResult<pb::DeleteSnapshotResponse> {
        require(&req.snapshot_id, "snapshot_id")?;
        let Ok(name) = VolumeName::try_from(req.snapshot_id.as_str()) else {
            return Ok(pb::DeleteSnapshotResponse {});
        };
        let _guard = self.locks.try_lock(&format!("snapshot:{name}"))?;
        match self.session().await?.delete_snapshot(&name).await {
            Ok(()) => info!(snapshot = %name, "snapshot deleted"),
            Err(e) if e.status() == Some(Wire::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(pb::DeleteSnapshotResponse {})
    }

    /// Spec: with `snapshot_id`, only that snapshot (none when it does not exist); with
    /// `source_volume_id`, only its snapshots (none for an unknown volume); at most `max_entries`
    /// with `next_token` set when more follow; a `starting_token` we did not issue: ABORTED.
    async fn list_snapshots(&self, req: pb::ListSnapshotsRequest) -> CsiResult<pb::ListSnapshotsResponse> {
        let max = u32::try_from(req.max_entries)
            .map_err(|_| CsiError::invalid("max_entries must not be negative"))?;
        let start_after = parse_page_token("s", &req.starting_token)?;
        let empty = pb::ListSnapshotsResponse { entries: vec![], next_token: String::new() };
        let entry = |s: &SnapshotInfo| pb::list_snapshots_response::Entry { snapshot: Some(csi_snapshot(s)) };
        let session = self.session().await?;
        if !req.snapshot_id.is_empty() {
            let Ok(name) = VolumeName::try_from(req.snapshot_id.as_str()) else { return Ok(empty) };
            let snap = match session.stat_snapshot(&name).await {
                Ok(s) => s,
                Err(e) if e.status() == Some(Wire::NotFound) => return Ok(empty),
                Err(e) => return Err(e.into()),
            };
            if !req.source_volume_id.is_empty() && snap.source.as_str() != req.source_volume_id {
                return Ok(empty);
            }
            return Ok(pb::ListSnapshotsResponse { entries: vec![entry(&snap)], next_token: String::new() });
        }
        let source = if req.source_volume_id.is_empty() {
            None
        } else {
            match VolumeName::try_from(req.source_volume_id.as_str()) {
                Ok(v) => Some(v),
                Err(_) => return Ok(empty),
            }
        };
        let max = if max == 0 { ferrovol_proto::limits::LIST_ENTRIES_MAX } else { max };
        let (page, more) = session.list_snapshots_page(source.as_ref(), start_after.as_ref(), max).await?;
        let next_token = match page.last() {
            Some(last) if more => page_token("s", &last.name),
            _ => String::new(),
        };
        Ok(pb::ListSnapshotsResponse { entries: page.iter().map(entry).collect(), next_token })
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("CreateVolume", r.name.clone(), self.create_volume(r))
    }
    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("DeleteVolume", r.volume_id.clone(), self.delete_volume(r))
    }
    async fn controller_publish_volume(
        &self,
        r: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("ControllerPublishVolume", r.volume_id.clone(), self.controller_publish_volume(r))
    }
    async fn controller_unpublish_volume(
        &self,
        r: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("ControllerUnpublishVolume", r.volume_id.clone(), self.controller_unpublish_volume(r))
    }
    async fn validate_volume_capabilities(
        &self,
        r: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("ValidateVolumeCapabilities", r.volume_id.clone(), self.validate_volume_capabilities(r))
    }
    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        crate::serve!("ListVolumes", String::new(), self.list_volumes(r.into_inner()))
    }
    async fn get_capacity(
        &self,
        r: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        crate::serve!("GetCapacity", String::new(), self.get_capacity(r.into_inner()))
    }
    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        crate::serve!("ControllerGetCapabilities", String::new(), async {
            CsiResult::Ok(Self::capabilities())
        })
    }
    async fn controller_expand_volume(
        &self,
        r: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("ControllerExpandVolume", r.volume_id.clone(), self.controller_expand_volume(r))
    }
    async fn controller_get_volume(
        &self,
        r: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("ControllerGetVolume", r.volume_id.clone(), self.controller_get_volume(r))
    }
    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("CreateSnapshot", r.name.clone(), self.create_snapshot(r))
    }
    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        crate::serve!("DeleteSnapshot", r.snapshot_id.clone(), self.delete_snapshot(r))
    }
    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        crate::serve!("ListSnapshots", String::new(), self.list_snapshots(r.into_inner()))
    }
}
