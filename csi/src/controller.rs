//! Controller: provisioning (CreateVolume/DeleteVolume/expansion) and attachment with single-writer
//! fencing (ControllerPublish sets the server's writer attachment to the node; no other node can write
//! until ControllerUnpublish clears it). Everything lives on the ferrovol server, so any replica of
//! the controller can answer any call: nothing is kept here.

use std::collections::HashMap;
use std::sync::Arc;

use ferrovol_client::ClientError;
use ferrovol_proto::csi::controller_server::Controller;
use ferrovol_proto::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use ferrovol_proto::csi::volume_capability::access_mode::Mode;
use ferrovol_proto::csi::volume_capability::AccessType;
use ferrovol_proto::csi::{self as pb, ControllerServiceCapability, VolumeCapability};
use ferrovol_proto::limits::{VOLUME_SIZE_ALIGN, VOLUME_SIZE_MAX};
use ferrovol_proto::{Labels, NodeId, Status as Wire, VolumeInfo, VolumeName};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::locks::VolumeLocks;
use crate::names::volume_name_for;
use crate::{ServerLink, TOPOLOGY_KEY};

/// Size of a volume whose CreateVolume gives no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Smallest volume we create (a filesystem needs some room).
pub const MIN_SIZE: u64 = 1 << 20;
/// StorageClass parameter: the filesystem made on first use (also `csi.storage.k8s.io/fstype`, which
/// the external-provisioner turns into the capability's fs_type).
pub const PARAM_FS_TYPE: &str = "fsType";
/// Volume labels the controller sets: the CSI name the volume was created for, and its fsType.
pub const LABEL_CSI_NAME: &str = "csi.ferrovol.io/name";
pub const LABEL_FS_TYPE: &str = "csi.ferrovol.io/fstype";
/// Filesystems the node plugin knows how to make and grow.
pub const FS_TYPES: [&str; 3] = ["ext4", "ext3", "xfs"];

#[derive(Debug)]
pub struct ControllerService {
    link: Arc<ServerLink>,
    locks: VolumeLocks,
}

impl ControllerService {
    pub fn new(link: Arc<ServerLink>, locks: VolumeLocks) -> Self {
        Self { link, locks }
    }

    async fn topology(&self) -> Result<Vec<pb::Topology>, Status> {
        let id = self.link.server_id().await?;
        Ok(vec![pb::Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), id)]) }])
    }

    async fn volume(
        &self,
        info: &VolumeInfo,
        context: HashMap<String, String>,
    ) -> Result<pb::Volume, Status> {
        Ok(pb::Volume {
            capacity_bytes: to_i64(info.size),
            volume_id: info.name.to_string(),
            volume_context: context,
            content_source: None,
            accessible_topology: self.topology().await?,
        })
    }
}

/// What NodeStage needs to know that the capability may not say (the StorageClass's fsType).
fn volume_context(info: &VolumeInfo) -> HashMap<String, String> {
    info.labels.get(LABEL_FS_TYPE).map(|fs| (PARAM_FS_TYPE.to_owned(), fs.clone())).into_iter().collect()
}

/// The gRPC status for a failed server call.
pub fn status_of(e: &ClientError) -> Status {
    let msg = e.to_string();
    match e.status() {
        Some(Wire::NotFound) => Status::not_found(msg),
        Some(Wire::AlreadyExists) => Status::already_exists(msg),
        Some(Wire::AttachedElsewhere) | Some(Wire::Busy) | Some(Wire::Fenced) => {
            Status::failed_precondition(msg)
        }
        Some(Wire::NoSpace) => Status::resource_exhausted(msg),
        Some(Wire::OutOfRange) => Status::out_of_range(msg),
        Some(Wire::InvalidName) | Some(Wire::InvalidArgument) | Some(Wire::TooLarge) => {
            Status::invalid_argument(msg)
        }
        Some(Wire::AuthFailed) => Status::permission_denied(msg),
        Some(Wire::ShuttingDown) | Some(Wire::NotReady) => Status::unavailable(msg),
        Some(_) => Status::internal(msg),
        None => match e {
            ClientError::InvalidArgument(_) => Status::invalid_argument(msg),
            _ => Status::unavailable(msg),
        },
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn require<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

/// A volume id from the CO. One that is not a valid ferrovol name cannot exist.
pub fn volume_id(id: &str) -> Result<VolumeName, Status> {
    require(id, "volume_id")?;
    VolumeName::try_from(id).map_err(|e| Status::not_found(format!("volume {id:?} does not exist ({e})")))
}

pub fn node_id(id: &str) -> Result<NodeId, Status> {
    require(id, "node_id")?;
    NodeId::try_from(id).map_err(|e| Status::not_found(format!("node {id:?} cannot exist ({e})")))
}

/// What a capability asks for, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub block: bool,
    pub fs_type: String,
    pub mount_flags: Vec<String>,
    /// The mode only lets the volume be read.
    pub reader_only: bool,
}

/// Checks one capability: an access type, a mode we serve, a filesystem we can make (ext4 when the
/// capability names none).
pub fn check_capability(cap: &VolumeCapability) -> Result<Access, String> {
    check_capability_or(cap, "ext4")
}

/// [`check_capability`], with `default_fs` for a mount capability that names no filesystem.
pub fn check_capability_or(cap: &VolumeCapability, default_fs: &str) -> Result<Access, String> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or("access_mode is required")?;
    let reader_only = match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => false,
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => true,
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(format!(
                "access mode {} is not supported: a block volume with a local filesystem has one writer node",
                mode.as_str_name()
            ))
        }
        Mode::Unknown => return Err("access_mode is required".into()),
    };
    match cap.access_type.as_ref().ok_or("access_type (block or mount) is required")? {
        AccessType::Block(_) => {
            Ok(Access { block: true, fs_type: String::new(), mount_flags: vec![], reader_only })
        }
        AccessType::Mount(m) => {
            let fs_type = if m.fs_type.is_empty() { default_fs.to_owned() } else { m.fs_type.clone() };
            if !FS_TYPES.contains(&fs_type.as_str()) {
                return Err(format!("fs_type {fs_type:?} is not supported (one of {FS_TYPES:?})"));
            }
            Ok(Access { block: false, fs_type, mount_flags: m.mount_flags.clone(), reader_only })
        }
    }
}

fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    for cap in caps {
        check_capability(cap).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

/// StorageClass parameters we understand; anything else is a typo the user should hear about. Keys of
/// the CO's own (`csi.storage.k8s.io/...`) pass.
fn check_parameters(params: &HashMap<String, String>) -> Result<(), Status> {
    for (k, v) in params {
        if k.starts_with("csi.storage.k8s.io/") {
            continue;
        }
        match k.as_str() {
            PARAM_FS_TYPE if FS_TYPES.contains(&v.as_str()) => {}
            PARAM_FS_TYPE => {
                return Err(Status::invalid_argument(format!("parameter fsType={v:?}: one of {FS_TYPES:?}")))
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "unknown StorageClass parameter {k:?} (known: {PARAM_FS_TYPE})"
                )))
            }
        }
    }
    Ok(())
}

/// The size to create for a capacity range: the smallest aligned size >= required_bytes (or the
/// default), within limit_bytes.
pub fn size_for(range: Option<&pb::CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument("capacity_range bytes must not be negative"));
    }
    let (required, limit) = (required.unsigned_abs(), limit.unsigned_abs());
    if limit != 0 && limit < required {
        return Err(Status::invalid_argument(format!(
            "limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    let wanted = if required == 0 {
        if limit == 0 {
            DEFAULT_SIZE
        } else {
            limit.min(DEFAULT_SIZE)
        }
    } else {
        required
    };
    let size = wanted.max(MIN_SIZE).div_ceil(VOLUME_SIZE_ALIGN) * VOLUME_SIZE_ALIGN;
    if size > VOLUME_SIZE_MAX || (limit != 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "no volume size fits required_bytes {required} and limit_bytes {limit} (sizes are multiples of \
             {VOLUME_SIZE_ALIGN} between {MIN_SIZE} and {VOLUME_SIZE_MAX})"
        )));
    }
    Ok(size)
}

fn fits(size: u64, range: Option<&pb::CapacityRange>) -> bool {
    let (required, limit) = range
        .map_or((0, 0), |r| (r.required_bytes.max(0).unsigned_abs(), r.limit_bytes.max(0).unsigned_abs()));
    size >= required && (limit == 0 || size <= limit)
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability { r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        require(&req.name, "name")?;
        check_capabilities(&req.volume_capabilities)?;
        check_parameters(&req.parameters)?;
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source: snapshots and clones are not supported (no CLONE_VOLUME capability)",
            ));
        }
        let size = size_for(req.capacity_range.as_ref())?;
        let name = volume_name_for(&req.name);
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.link.session().await?;
        // The volume keeps its CSI name and parameters, so a retry is recognised as the same request
        // and a different request that maps to the same volume is not.
        let mut labels = Labels::from([(LABEL_CSI_NAME.to_owned(), req.name.clone())]);
        if let Some(fs) = req.parameters.get(PARAM_FS_TYPE) {
            labels.insert(LABEL_FS_TYPE.to_owned(), fs.clone());
        }
        ferrovol_proto::validate_labels(&labels).map_err(|_| {
            Status::invalid_argument(format!("name is {} bytes; at most 1024 are kept", req.name.len()))
        })?;
        let matches = |v: &VolumeInfo| -> Result<(), Status> {
            if v.labels != labels {
                return Err(Status::already_exists(format!(
                    "volume {name} exists for another request (CSI name {:?}, parameters {:?})",
                    v.labels
                        .get(LABEL_CSI_NAME)
                        .map(String::as_str)
                        .unwrap_or("none: not made by ferrovol-csi"),
                    v.labels.get(LABEL_FS_TYPE)
                )));
            }
            if !fits(v.size, req.capacity_range.as_ref()) {
                return Err(Status::already_exists(format!(
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
                match session.create_volume_labeled(&name, size, labels.clone()).await {
                    Ok(v) => {
                        info!(csi_name = %req.name, volume = %name, size, "volume created");
                        v
                    }
                    // Created by a racing call between our STAT and CREATE: take it if it matches.
                    Err(e) if e.status() == Some(Wire::AlreadyExists) => {
                        let v = session.stat_volume(&name).await.map_err(|e| status_of(&e))?;
                        matches(&v)?;
                        v
                    }
                    Err(e) => return Err(status_of(&e)),
                }
            }
            Err(e) => return Err(status_of(&e)),
        };
        let context = volume_context(&info);
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(self.volume(&info, context).await?) }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        require(&req.volume_id, "volume_id")?;
        // An id that is not a ferrovol name cannot exist: deleting it is done.
        let Ok(name) = VolumeName::try_from(req.volume_id.as_str()) else {
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.link.session().await?;
        match session.delete_volume(&name).await {
            Ok(()) => info!(volume = %name, "volume deleted"),
            Err(e) if e.status() == Some(Wire::NotFound) => {}
            Err(e) => return Err(status_of(&e)),
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = volume_id(&req.volume_id)?;
        let node = node_id(&req.node_id)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let access = check_capability(cap).map_err(Status::invalid_argument)?;
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.link.session().await?;
        let read_only = req.readonly || access.reader_only;
        // The volume first (NOT_FOUND), then a writer elsewhere (FAILED_PRECONDITION, whatever the
        // node), then the node itself: only nodes whose plugin registered at kubelet's NodeGetInfo.
        let info = session.stat_volume(&name).await.map_err(|e| status_of(&e))?;
        if let Some(owner) = info.owner.as_ref().filter(|o| !read_only && **o != node) {
            return Err(Status::failed_precondition(format!(
                "volume {name} is published for writing to node {owner}; unpublish it there first"
            )));
        }
        session.stat_node(&node).await.map_err(|e| match e.status() {
            Some(Wire::NotFound) => Status::not_found(format!(
                "node {node} is not known to the ferrovol server (its node plugin never registered)"
            )),
            _ => status_of(&e),
        })?;
        let mut context = HashMap::from([("readonly".to_owned(), read_only.to_string())]);
        // Readers need no attachment; the node opens the volume read-only.
        if !read_only {
            let generation = session.attach_set(&name, &node, false).await.map_err(|e| match e.status() {
                Some(Wire::AttachedElsewhere) => Status::failed_precondition(format!(
                    "volume {name} is published for writing to another node; unpublish it there first ({e})"
                )),
                _ => status_of(&e),
            })?;
            info!(volume = %name, node = %node, generation, "published for writing");
            context.insert("generation".to_owned(), generation.to_string());
        }
        Ok(Response::new(pb::ControllerPublishVolumeResponse { publish_context: context }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        require(&req.volume_id, "volume_id")?;
        let Ok(name) = VolumeName::try_from(req.volume_id.as_str()) else {
            return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
        };
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.link.session().await?;
        let info = match session.stat_volume(&name).await {
            Ok(info) => info,
            Err(e) if e.status() == Some(Wire::NotFound) => {
                return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
            }
            Err(e) => return Err(status_of(&e)),
        };
        // Without a node id: unpublish from every node (the writer is the only one we track).
        let target = if req.node_id.is_empty() {
            info.owner.clone()
        } else {
            NodeId::try_from(req.node_id.as_str()).ok()
        };
        if let (Some(node), Some(owner)) = (target, info.owner.as_ref()) {
            if &node == owner {
                match session.attach_clear(&name, &node, 0).await {
                    Ok(()) => info!(volume = %name, node = %node, "unpublished"),
                    Err(e) if matches!(e.status(), Some(Wire::AttachedElsewhere) | Some(Wire::NotFound)) => {}
                    Err(e) => return Err(status_of(&e)),
                }
            }
        }
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let name = volume_id(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let session = self.link.session().await?;
        session.stat_volume(&name).await.map_err(|e| status_of(&e))?;
        if let Err(e) = check_parameters(&req.parameters) {
            return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_owned(),
            }));
        }
        for cap in &req.volume_capabilities {
            if let Err(why) = check_capability(cap) {
                return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                }));
            }
        }
        Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let max = u32::try_from(req.max_entries)
            .map_err(|_| Status::invalid_argument("max_entries must not be negative"))?;
        // The token is the last volume name of the previous page.
        let start_after = if req.starting_token.is_empty() {
            None
        } else {
            Some(VolumeName::try_from(req.starting_token.as_str()).map_err(|_| {
                Status::aborted(format!(
                    "starting_token {:?} was not returned by ListVolumes",
                    req.starting_token
                ))
            })?)
        };
        let session = self.link.session().await?;
        let max = if max == 0 { ferrovol_proto::limits::LIST_ENTRIES_MAX } else { max };
        let (page, more) =
            session.list_volumes_page(start_after.as_ref(), max).await.map_err(|e| status_of(&e))?;
        let topology = self.topology().await?;
        let next_token =
            if more { page.last().map(|v| v.name.to_string()).unwrap_or_default() } else { String::new() };
        let entries = page
            .into_iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(pb::Volume {
                    capacity_bytes: to_i64(v.size),
                    volume_id: v.name.to_string(),
                    volume_context: volume_context(&v),
                    content_source: None,
                    accessible_topology: topology.clone(),
                }),
                status: None,
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        for cap in &req.volume_capabilities {
            if check_capability(cap).is_err() {
                // The spec: capacity for capabilities we cannot serve is zero.
                return Ok(Response::new(pb::GetCapacityResponse {
                    available_capacity: 0,
                    ..Default::default()
                }));
            }
        }
        check_parameters(&req.parameters)?;
        let session = self.link.session().await?;
        if let Some(t) = &req.accessible_topology {
            let ours = session.server_info().server_id.clone();
            if t.segments.get(TOPOLOGY_KEY).is_some_and(|v| *v != ours) {
                return Ok(Response::new(pb::GetCapacityResponse {
                    available_capacity: 0,
                    ..Default::default()
                }));
            }
        }
        let stat = session.store_stat().await.map_err(|e| status_of(&e))?;
        let available = stat.free_bytes / VOLUME_SIZE_ALIGN * VOLUME_SIZE_ALIGN;
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: to_i64(available),
            // Volumes are sparse, so one may be larger than the free space; this is the protocol's cap.
            maximum_volume_size: Some(to_i64(VOLUME_SIZE_MAX)),
            minimum_volume_size: Some(to_i64(MIN_SIZE)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type::*;
        let capabilities = [
            CreateDeleteVolume,
            PublishUnpublishVolume,
            ListVolumes,
            GetCapacity,
            PublishReadonly,
            ExpandVolume,
            GetVolume,
            SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(rpc_cap)
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = volume_id(&req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        if let Some(cap) = &req.volume_capability {
            check_capability(cap).map_err(Status::invalid_argument)?;
        }
        let wanted = size_for(Some(range))?;
        let _guard = self.locks.try_lock(name.as_str())?;
        let session = self.link.session().await?;
        let current = session.stat_volume(&name).await.map_err(|e| status_of(&e))?;
        let info = if current.size >= wanted {
            if !fits(current.size, Some(range)) {
                return Err(Status::out_of_range(format!(
                    "volume {name} is already {} bytes, above limit_bytes {} (volumes do not shrink)",
                    current.size, range.limit_bytes
                )));
            }
            current
        } else {
            let v = session.resize_volume(&name, wanted).await.map_err(|e| status_of(&e))?;
            info!(volume = %name, from = current.size, to = v.size, "volume expanded");
            v
        };
        // The node refreshes its loop device (and grows the filesystem for mount volumes).
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(info.size),
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = volume_id(&req.volume_id)?;
        let session = self.link.session().await?;
        let info = session.stat_volume(&name).await.map_err(|e| status_of(&e))?;
        let published_node_ids = info.owner.iter().map(|o| o.to_string()).collect();
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(self.volume(&info, volume_context(&info)).await?),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(pb::VolumeCondition {
                    abnormal: false,
                    message: "reachable on the server".into(),
                }),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> pb::CapacityRange {
        pb::CapacityRange { required_bytes: required, limit_bytes: limit }
    }

    #[test]
    fn sizes_honour_the_capacity_range() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(10 << 20, 0))).unwrap(), 10 << 20);
        assert_eq!(size_for(Some(&range(10_000_001, 0))).unwrap(), 10_002_432);
        assert_eq!(size_for(Some(&range(1, 0))).unwrap(), MIN_SIZE);
        assert_eq!(size_for(Some(&range(0, 64 << 20))).unwrap(), 64 << 20);
        assert_eq!(size_for(Some(&range(5, 4))).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(size_for(Some(&range(100, 200))).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&range(-1, 0))).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(fits(10 << 20, Some(&range(10 << 20, 0))));
        assert!(!fits(10 << 20, Some(&range(11 << 20, 0))));
    }

    #[test]
    fn capabilities() {
        use pb::volume_capability::{AccessMode, BlockVolume, MountVolume};
        let cap = |t: Option<AccessType>, mode: Mode| VolumeCapability {
            access_type: t,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        };
        let mount =
            |fs: &str| Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }));
        assert_eq!(check_capability(&cap(mount(""), Mode::SingleNodeWriter)).unwrap().fs_type, "ext4");
        assert!(
            check_capability(&cap(Some(AccessType::Block(BlockVolume {})), Mode::SingleNodeReaderOnly))
                .unwrap()
                .reader_only
        );
        assert!(check_capability(&cap(mount("zfs"), Mode::SingleNodeWriter)).is_err());
        assert!(check_capability(&cap(mount(""), Mode::MultiNodeMultiWriter)).is_err());
        assert!(check_capability(&cap(None, Mode::SingleNodeWriter)).is_err());
        assert!(check_capability(&VolumeCapability { access_type: mount(""), access_mode: None }).is_err());
    }
}
