//! ferrovol-csi's RPC contract through its unix socket, as kubelet and the sidecars call it, with a
//! real server on 127.0.0.1: every required field, every error code the spec names, snapshots,
//! content sources and pagination. Nothing here stages a volume, so it needs no root, FUSE or loop
//! devices and runs on any machine (the privileged flows are in flow.rs).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::collections::HashMap;

use common::*;
use ferrovol_proto::csi::volume_capability::access_mode::Mode;
use ferrovol_proto::csi::*;
use ferrovol_server::testing::TestServer;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_fields_and_bad_input_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "node-a", "all").await;
    let c = Some(cap(false, Mode::SingleNodeWriter));
    let ctl = &mut p.controller;
    inv(
        ctl.create_volume(CreateVolumeRequest { name: String::new(), ..create_req("x", 1 << 20, false) })
            .await,
        "create without name",
    );
    inv(
        ctl.create_volume(CreateVolumeRequest {
            volume_capabilities: vec![],
            ..create_req("x", 1 << 20, false)
        })
        .await,
        "create without capabilities",
    );
    inv(
        ctl.create_volume(CreateVolumeRequest {
            parameters: HashMap::from([("bogus".into(), "1".into())]),
            ..create_req("x", 1 << 20, false)
        })
        .await,
        "create with an unknown parameter",
    );
    inv(ctl.delete_volume(DeleteVolumeRequest::default()).await, "delete without id");
    inv(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            node_id: "n".into(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await,
        "publish without volume",
    );
    inv(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: "v".into(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await,
        "publish without node",
    );
    inv(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: "v".into(),
            node_id: "n".into(),
            ..Default::default()
        })
        .await,
        "publish without capability",
    );
    inv(
        ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default()).await,
        "unpublish without volume",
    );
    inv(
        ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "v".into(),
            ..Default::default()
        })
        .await,
        "validate without capabilities",
    );
    inv(
        ctl.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "v".into(),
            ..Default::default()
        })
        .await,
        "expand without range",
    );
    inv(
        ctl.list_volumes(ListVolumesRequest { max_entries: -1, ..Default::default() }).await,
        "negative max_entries",
    );
    assert_eq!(
        ctl.list_volumes(ListVolumesRequest { starting_token: "Not A Token".into(), ..Default::default() })
            .await
            .unwrap_err()
            .code(),
        Code::Aborted
    );
    let node = &mut p.node;
    let staging = dir.path().join("s").display().to_string();
    let target = dir.path().join("t").display().to_string();
    inv(
        node.node_stage_volume(NodeStageVolumeRequest {
            staging_target_path: staging.clone(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await,
        "stage without volume",
    );
    inv(
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: "v".into(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await,
        "stage without path",
    );
    inv(
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.clone(),
            ..Default::default()
        })
        .await,
        "stage without capability",
    );
    inv(
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: "relative/path".into(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await,
        "stage at a relative path",
    );
    inv(
        node.node_unstage_volume(NodeUnstageVolumeRequest { volume_id: "v".into(), ..Default::default() })
            .await,
        "unstage without path",
    );
    inv(
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.clone(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await,
        "publish without target",
    );
    inv(
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            ..Default::default()
        })
        .await,
        "publish without capability",
    );
    inv(
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            target_path: target.clone(),
            ..Default::default()
        })
        .await,
        "unpublish without volume",
    );
    inv(
        node.node_get_volume_stats(NodeGetVolumeStatsRequest { volume_id: "v".into(), ..Default::default() })
            .await,
        "stats without path",
    );
    // Unknown volumes: NOT_FOUND; unknown things to undo: OK (idempotent).
    let nf = node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: "no-such-volume".into(),
            staging_target_path: staging.clone(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(nf.code(), Code::NotFound, "{nf:?}");
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: "no-such-volume".into(),
        staging_target_path: staging.clone(),
    })
    .await
    .unwrap();
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "no-such-volume".into(),
        target_path: target.clone(),
    })
    .await
    .unwrap();
    let ctl = &mut p.controller;
    ctl.delete_volume(DeleteVolumeRequest { volume_id: "../../etc".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: "no-such-volume".into(),
            node_id: "n".into(),
            volume_capability: c.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );

    // Pagination: 5 volumes in pages of 2.
    for i in 0..5 {
        ctl.create_volume(create_req(&format!("page-{i}"), 1 << 20, false)).await.unwrap();
    }
    let (mut seen, mut token) = (vec![], String::new());
    loop {
        let page = ctl
            .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: token })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
}

fn mount_caps() -> Vec<VolumeCapability> {
    vec![cap(false, Mode::SingleNodeWriter)]
}

fn from_source(
    name: &str,
    source: volume_content_source::Type,
    range: Option<CapacityRange>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: range,
        volume_capabilities: mount_caps(),
        volume_content_source: Some(VolumeContentSource { r#type: Some(source) }),
        ..Default::default()
    }
}

fn snap_src(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: id.into() })
}

fn vol_src(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: id.into() })
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

fn snap_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_clones_and_restores_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "ctl", "controller").await;
    let ctl = &mut p.controller;
    let caps =
        ctl.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let has = |t: controller_service_capability::rpc::Type| {
        caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(controller_service_capability::Type::Rpc(r)) if r.r#type == t as i32)
        })
    };
    use controller_service_capability::rpc::Type as T;
    assert!(has(T::CreateDeleteSnapshot) && has(T::ListSnapshots) && has(T::CloneVolume));

    let vol =
        ctl.create_volume(create_req("pvc-src", 16 << 20, false)).await.unwrap().into_inner().volume.unwrap();
    let other = ctl
        .create_volume(create_req("pvc-other", 8 << 20, false))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let src = vol.volume_id.clone();

    // CreateSnapshot: required fields, a missing source, parameters of a VolumeSnapshotClass.
    assert_eq!(code(ctl.create_snapshot(snap_req("", &src)).await), Code::InvalidArgument);
    assert_eq!(code(ctl.create_snapshot(snap_req("s", "")).await), Code::InvalidArgument);
    assert_eq!(code(ctl.create_snapshot(snap_req("s", "no-such-volume")).await), Code::NotFound);
    let bad = CreateSnapshotRequest {
        parameters: HashMap::from([("retention".into(), "7d".into())]),
        ..snap_req("s", &src)
    };
    assert_eq!(code(ctl.create_snapshot(bad).await), Code::InvalidArgument);
    let ok = CreateSnapshotRequest {
        parameters: HashMap::from([("csi.storage.k8s.io/volumesnapshot/name".into(), "s".into())]),
        ..snap_req("snapshot-1", &src)
    };
    let s1 = ctl.create_snapshot(ok).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!((s1.source_volume_id.as_str(), s1.size_bytes), (src.as_str(), 16 << 20));
    assert!(s1.creation_time.as_ref().is_some_and(|t| t.seconds > 1_700_000_000));
    // Idempotent by name (the CO polls it until ready); the same name of another volume conflicts.
    let mut again =
        ctl.create_snapshot(snap_req("snapshot-1", &src)).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(again.snapshot_id, s1.snapshot_id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !again.ready_to_use {
        assert!(std::time::Instant::now() < deadline, "snapshot never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        again =
            ctl.create_snapshot(snap_req("snapshot-1", &src)).await.unwrap().into_inner().snapshot.unwrap();
    }
    assert_eq!(
        code(ctl.create_snapshot(snap_req("snapshot-1", &other.volume_id)).await),
        Code::AlreadyExists
    );
    let s2 = ctl
        .create_snapshot(snap_req("snapshot-2", &other.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();

    // ListSnapshots: all, by id, by source, paginated; unknown ids list nothing; bad tokens ABORTED.
    let lister = ctl.clone();
    let list = |r: ListSnapshotsRequest| {
        let mut ctl = lister.clone();
        async move {
            let page = ctl.list_snapshots(r).await.unwrap().into_inner();
            let ids: Vec<String> =
                page.entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id).collect();
            (ids, page.next_token)
        }
    };
    let (all, token) = list(ListSnapshotsRequest::default()).await;
    assert_eq!((all.len(), token.as_str()), (2, ""));
    let (one, _) =
        list(ListSnapshotsRequest { snapshot_id: s1.snapshot_id.clone(), ..Default::default() }).await;
    assert_eq!(one, vec![s1.snapshot_id.clone()]);
    let (by_src, _) =
        list(ListSnapshotsRequest { source_volume_id: other.volume_id.clone(), ..Default::default() }).await;
    assert_eq!(by_src, vec![s2.snapshot_id.clone()]);
    let (mismatch, _) = list(ListSnapshotsRequest {
        snapshot_id: s1.snapshot_id.clone(),
        source_volume_id: other.volume_id.clone(),
        ..Default::default()
    })
    .await;
    assert!(mismatch.is_empty());
    for unknown in [
        ListSnapshotsRequest { snapshot_id: "no-such-snapshot".into(), ..Default::default() },
        ListSnapshotsRequest { snapshot_id: "Not A Name".into(), ..Default::default() },
        ListSnapshotsRequest { source_volume_id: "no-such-volume".into(), ..Default::default() },
    ] {
        assert!(list(unknown).await.0.is_empty());
    }
    let (first, token) = list(ListSnapshotsRequest { max_entries: 1, ..Default::default() }).await;
    assert_eq!(first.len(), 1);
    assert!(!token.is_empty());
    let (second, end) =
        list(ListSnapshotsRequest { max_entries: 1, starting_token: token, ..Default::default() }).await;
    assert_eq!((second.len(), end.as_str()), (1, ""));
    assert_ne!(first, second);
    let bad_token = ListSnapshotsRequest { starting_token: "invalid-token".into(), ..Default::default() };
    assert_eq!(code(ctl.list_snapshots(bad_token).await), Code::Aborted);
    assert_eq!(
        code(ctl.list_snapshots(ListSnapshotsRequest { max_entries: -1, ..Default::default() }).await),
        Code::InvalidArgument
    );

    // Restore: the content source is echoed, the size is the snapshot's unless more is asked, a
    // limit below it is OUT_OF_RANGE, a missing snapshot NOT_FOUND; the name is idempotent with the
    // same source only.
    let restored = ctl
        .create_volume(from_source("pvc-restored", snap_src(&s1.snapshot_id), None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 16 << 20);
    assert_eq!(
        restored.content_source,
        Some(VolumeContentSource { r#type: Some(snap_src(&s1.snapshot_id)) })
    );
    let again = ctl
        .create_volume(from_source("pvc-restored", snap_src(&s1.snapshot_id), None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, restored.volume_id);
    assert_eq!(
        code(ctl.create_volume(from_source("pvc-restored", snap_src(&s2.snapshot_id), None)).await),
        Code::AlreadyExists
    );
    let big = ctl
        .create_volume(from_source(
            "pvc-big",
            snap_src(&s1.snapshot_id),
            Some(CapacityRange { required_bytes: 32 << 20, limit_bytes: 0 }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(big.capacity_bytes, 32 << 20);
    let small = from_source(
        "pvc-small",
        snap_src(&s1.snapshot_id),
        Some(CapacityRange { required_bytes: 0, limit_bytes: 8 << 20 }),
    );
    assert_eq!(code(ctl.create_volume(small).await), Code::OutOfRange);
    assert_eq!(
        code(ctl.create_volume(from_source("pvc-x", snap_src("no-such-snapshot"), None)).await),
        Code::NotFound
    );
    assert_eq!(
        code(ctl.create_volume(from_source("pvc-x", vol_src("no-such-volume"), None)).await),
        Code::NotFound
    );
    // Clone.
    let clone = ctl
        .create_volume(from_source("pvc-clone", vol_src(&src), None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(clone.content_source, Some(VolumeContentSource { r#type: Some(vol_src(&src)) }));
    assert_eq!(clone.capacity_bytes, 16 << 20);
    // ListVolumes shows where they came from.
    let listed = ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    let entry = listed
        .entries
        .iter()
        .find_map(|e| e.volume.as_ref().filter(|v| v.volume_id == clone.volume_id))
        .unwrap();
    assert!(entry.content_source.is_some());

    // The source goes away; the snapshot stays restorable.
    ctl.delete_volume(DeleteVolumeRequest { volume_id: src.clone(), ..Default::default() }).await.unwrap();
    let (still, _) =
        list(ListSnapshotsRequest { snapshot_id: s1.snapshot_id.clone(), ..Default::default() }).await;
    assert_eq!(still.len(), 1);
    ctl.create_volume(from_source("pvc-after", snap_src(&s1.snapshot_id), None)).await.unwrap();

    // DeleteSnapshot: idempotent, and a missing field is INVALID_ARGUMENT.
    let del = |id: &str| DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    ctl.delete_snapshot(del(&s1.snapshot_id)).await.unwrap();
    ctl.delete_snapshot(del(&s1.snapshot_id)).await.unwrap();
    ctl.delete_snapshot(del("../../not a name")).await.unwrap();
    assert_eq!(code(ctl.delete_snapshot(del("")).await), Code::InvalidArgument);
    assert_eq!(
        code(ctl.create_volume(from_source("pvc-gone", snap_src(&s1.snapshot_id), None)).await),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_tokens_are_ours_and_outlive_the_volume_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "ctl", "controller").await;
    let ctl = &mut p.controller;
    let mut ids = vec![];
    for i in 0..3 {
        ids.push(
            ctl.create_volume(create_req(&format!("tok-{i}"), 1 << 20, false))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    ids.sort();
    let page = ctl
        .list_volumes(ListVolumesRequest { max_entries: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries[0].volume.as_ref().unwrap().volume_id, ids[0]);
    assert!(!page.next_token.is_empty());
    // The volume the token points at is deleted: the token still continues after it.
    ctl.delete_volume(DeleteVolumeRequest { volume_id: ids[0].clone(), ..Default::default() }).await.unwrap();
    let rest = ctl
        .list_volumes(ListVolumesRequest { max_entries: 0, starting_token: page.next_token })
        .await
        .unwrap()
        .into_inner();
    let rest: Vec<String> = rest.entries.into_iter().map(|e| e.volume.unwrap().volume_id).collect();
    assert_eq!(rest, ids[1..].to_vec());
    // Tokens we never issued: ABORTED, a bare volume name included.
    for bad in ["invalid-token", ids[1].as_str()] {
        let r = ctl.list_volumes(ListVolumesRequest { max_entries: 0, starting_token: bad.into() }).await;
        assert_eq!(code(r), Code::Aborted, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_read_only_to_the_node_that_writes_is_already_exists() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "node-a", "all").await;
    p.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    let vol = p
        .controller
        .create_volume(create_req("pvc-pub", 1 << 20, false))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let publish = |readonly: bool| ControllerPublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: "node-a".into(),
        volume_capability: Some(cap(false, Mode::SingleNodeWriter)),
        readonly,
        ..Default::default()
    };
    let rw = p.controller.controller_publish_volume(publish(false)).await.unwrap().into_inner();
    assert_eq!(rw.publish_context["readonly"], "false");
    let again = p.controller.controller_publish_volume(publish(false)).await.unwrap().into_inner();
    assert_eq!(again.publish_context, rw.publish_context, "idempotent");
    let e = p.controller.controller_publish_volume(publish(true)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // Once unpublished, read-only is fine.
    let unpublish = ControllerUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    };
    p.controller.controller_unpublish_volume(unpublish).await.unwrap();
    p.controller.controller_publish_volume(publish(true)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lookups_of_what_is_not_here_are_not_found_and_the_attach_limit_is_real() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "node-a", "all").await;
    let vol = p
        .controller
        .create_volume(create_req("pvc-here", 1 << 20, false))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    let expand = |id: &str, path: &str| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    let here = dir.path().display().to_string();
    for (id, path) in [
        ("no-such-volume", here.as_str()),
        (vol.volume_id.as_str(), here.as_str()),
        (vol.volume_id.as_str(), "some/path"),
        ("Not A Name", here.as_str()),
    ] {
        assert_eq!(
            code(p.node.node_get_volume_stats(stats(id, path)).await),
            Code::NotFound,
            "stats {id} {path}"
        );
        assert_eq!(
            code(p.node.node_expand_volume(expand(id, path)).await),
            Code::NotFound,
            "expand {id} {path}"
        );
    }
    assert_eq!(code(p.node.node_get_volume_stats(stats(&vol.volume_id, "")).await), Code::InvalidArgument);
    assert_eq!(code(p.node.node_expand_volume(expand(&vol.volume_id, "")).await), Code::InvalidArgument);
    assert_eq!(code(p.node.node_get_volume_stats(stats("", &here)).await), Code::InvalidArgument);
    // NodeGetInfo reports a limit: derived from the node by default, or the one configured.
    let info = p.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert!(info.max_volumes_per_node > 0, "{info:?}");
    drop(p);
    let mut q = Plugin::start_with_args(
        dir.path(),
        &server.addr.to_string(),
        "node-b",
        "node",
        &["--max-volumes-per-node", "3"],
    )
    .await;
    assert_eq!(
        q.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner().max_volumes_per_node,
        3
    );
}

/// Every RPC leaves one log line with its method, id, gRPC code and message and its duration, a
/// failed one included; secrets in the request never appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_logged_with_its_outcome_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let log = dir.path().join("csi.log");
    let mut p = Plugin::start_logging(dir.path(), &server.addr.to_string(), &log).await;
    let secret = "s3cr3t-value-never-logged";
    let mut req = create_req("pvc-logged", 1 << 20, false);
    req.secrets.insert("password".into(), secret.into());
    let id = p.controller.create_volume(req).await.unwrap().into_inner().volume.unwrap().volume_id;
    let publish = ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "no-such-node".into(),
        volume_capability: Some(cap(false, Mode::SingleNodeWriter)),
        secrets: HashMap::from([("password".into(), secret.into())]),
        ..Default::default()
    };
    assert_eq!(code(p.controller.controller_publish_volume(publish).await), Code::NotFound);
    drop(p);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(secret), "a secret reached the log:\n{text}");
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let find = |method: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["method"] == method)
            .unwrap_or_else(|| panic!("no log line for {method}:\n{text}"))
            .clone()
    };
    let created = find("CreateVolume");
    assert_eq!(created["fields"]["message"], "ok");
    assert_eq!(created["fields"]["id"], "pvc-logged");
    assert!(created["fields"]["ms"].is_u64());
    let failed = find("ControllerPublishVolume");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["fields"]["id"], id.as_str());
    assert_eq!(failed["fields"]["code"], "NotFound");
    assert_eq!(failed["fields"]["message"], "failed");
    assert!(failed["fields"]["error"].as_str().unwrap().contains("no-such-node"), "{failed}");
    assert!(failed["span"]["method"] == "ControllerPublishVolume" || failed["spans"].is_array(), "{failed}");
}
