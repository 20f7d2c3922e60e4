//! Identity: who we are, what we offer, whether we are ready.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ferrovol_proto::csi::identity_server::Identity;
use ferrovol_proto::csi::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use ferrovol_proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::{Config, Mode, ServerLink, DRIVER_NAME};

#[derive(Debug)]
pub struct IdentityService {
    config: Config,
    link: Arc<ServerLink>,
}

impl IdentityService {
    pub fn new(config: Config, link: Arc<ServerLink>) -> Self {
        Self { config, link }
    }
}

impl IdentityService {
    async fn get_plugin_info_inner(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::from([("mode".to_owned(), format!("{:?}", self.config.mode).to_lowercase())]),
        }))
    }

    async fn get_plugin_capabilities_inner(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let svc =
            |t: service::Type| PluginCapability { r#type: Some(Type::Service(Service { r#type: t as i32 })) };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                svc(service::Type::ControllerService),
                svc(service::Type::VolumeAccessibilityConstraints),
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    async fn probe_inner(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        if matches!(self.config.mode, Mode::Node | Mode::All) {
            if !Path::new("/dev/fuse").exists() {
                return Err(Status::failed_precondition("/dev/fuse is missing on this node"));
            }
            for tool in ["losetup", "blkid", "mount", "umount", "mkfs.ext4"] {
                if ferrovol_client::host::which(tool).is_none() {
                    return Err(Status::failed_precondition(format!("{tool} is not installed on this node")));
                }
            }
        }
        if matches!(self.config.mode, Mode::Controller | Mode::All) {
            self.link.session().await?;
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        crate::rpc::logged("GetPluginInfo", "", self.get_plugin_info_inner(request)).await
    }

    async fn get_plugin_capabilities(
        &self,
        request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        crate::rpc::logged("GetPluginCapabilities", "", self.get_plugin_capabilities_inner(request)).await
    }

    async fn probe(&self, request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        crate::rpc::logged("Probe", "", self.probe_inner(request)).await
    }
}
