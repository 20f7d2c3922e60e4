//! ferrovol-csi driven through its unix socket exactly as kubelet and the sidecars do, with a real
//! server on 127.0.0.1, real FUSE attach processes, loop devices, mkfs.ext4 and bind mounts
//! (privileged: root, /dev/fuse, losetup; without them FERROVOL-SKIPPED, a failure under CI).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ferrovol_client::{ConnectOptions, Session};
use ferrovol_proto::csi::volume_capability::access_mode::Mode;
use ferrovol_proto::csi::*;
use ferrovol_server::testing::{privileged, TestServer};
use tonic::Code;

/// Every RPC of the flow is sent twice: the second must succeed too and change nothing.
async fn full_flow(p: &mut Plugin, dir: &Path, block: bool) {
    let name = if block { "pvc-Block/Volume 1" } else { "pvc-Mount Volume ☃" };
    let vol = p
        .controller
        .create_volume(create_req(name, 64 << 20, block))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let again = p
        .controller
        .create_volume(create_req(name, 64 << 20, block))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, again.volume_id);
    assert_eq!(vol.capacity_bytes, 64 << 20);
    assert!(!vol.accessible_topology.is_empty());
    let err = p.controller.create_volume(create_req(name, 128 << 20, block)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Same name, other StorageClass parameters: not the same request.
    let mut other = create_req(name, 64 << 20, block);
    other.parameters.insert("fsType".into(), "xfs".into());
    assert_eq!(p.controller.create_volume(other).await.unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(vol.volume_context.get("fsType").map(String::as_str), Some("ext4"));
    let id = vol.volume_id.clone();
    let c = cap(block, Mode::SingleNodeWriter);

    let publish = ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    let ctx =
        p.controller.controller_publish_volume(publish.clone()).await.unwrap().into_inner().publish_context;
    assert_eq!(
        ctx,
        p.controller.controller_publish_volume(publish.clone()).await.unwrap().into_inner().publish_context
    );

    let staging = dir.join(format!("staging-{id}"));
    std::fs::create_dir_all(&staging).unwrap();
    let stage = NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    p.node.node_stage_volume(stage.clone()).await.unwrap();
    p.node.node_stage_volume(stage.clone()).await.unwrap();
    assert_eq!(is_mounted(&staging), !block);

    let target = dir.join(format!("pods/{id}/target"));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    if block {
        // Some COs (csi-sanity) create the target as a directory even for raw block: it must work.
        std::fs::create_dir_all(&target).unwrap();
    }
    let publish_node = NodePublishVolumeRequest {
        volume_id: id.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(c.clone()),
        readonly: false,
        ..Default::default()
    };
    p.node.node_publish_volume(publish_node.clone()).await.unwrap();
    p.node.node_publish_volume(publish_node.clone()).await.unwrap();
    assert!(is_mounted(&target));

    // Real I/O in the target, then read back.
    let payload: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    if block {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&target).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&payload).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0; payload.len()];
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back == payload, "block data differs");
    } else {
        std::fs::write(target.join("hello.bin"), &payload).unwrap();
        std::fs::File::open(target.join("hello.bin")).unwrap().sync_all().unwrap();
        assert!(std::fs::read(staging.join("hello.bin")).unwrap() == payload);
    }

    let stats = p
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    let bytes = stats.usage.iter().find(|u| u.unit == volume_usage::Unit::Bytes as i32).unwrap();
    assert!(bytes.total > 32 << 20 && bytes.total <= 64 << 20, "{stats:?}", stats = stats.usage);

    // Unstage while still published is refused (never pull a volume from under a pod).
    let unstage = NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    assert_eq!(
        p.node.node_unstage_volume(unstage.clone()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    let unpublish =
        NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: target.display().to_string() };
    p.node.node_unpublish_volume(unpublish.clone()).await.unwrap();
    p.node.node_unpublish_volume(unpublish.clone()).await.unwrap();
    assert!(!is_mounted(&target) && !target.exists());

    p.node.node_unstage_volume(unstage.clone()).await.unwrap();
    p.node.node_unstage_volume(unstage.clone()).await.unwrap();
    assert!(!is_mounted(&staging));
    let loops = String::from_utf8(Command::new("losetup").arg("-a").output().unwrap().stdout).unwrap();
    assert!(!loops.contains(&id), "loop device left: {loops}");

    // Deleting a volume still published for writing is refused; after unpublish it goes.
    let delete = DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() };
    assert_eq!(
        p.controller.delete_volume(delete.clone()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let unpublish_ctl = ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    };
    p.controller.controller_unpublish_volume(unpublish_ctl.clone()).await.unwrap();
    p.controller.controller_unpublish_volume(unpublish_ctl.clone()).await.unwrap();
    p.controller.delete_volume(delete.clone()).await.unwrap();
    p.controller.delete_volume(delete.clone()).await.unwrap();
    let err = p
        .controller
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_order_mount_and_block() {
    if !privileged("kubelet_order_mount_and_block", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "node-a", "all").await;

    let info = p.identity.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.ferrovol.io");
    assert!(!info.vendor_version.is_empty());
    assert_eq!(p.identity.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
    let caps =
        p.identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert_eq!(caps.capabilities.len(), 3);
    let node_info = p.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(node_info.node_id, "node-a");
    assert!(node_info.accessible_topology.is_some());
    let capacity = p.controller.get_capacity(GetCapacityRequest::default()).await.unwrap().into_inner();
    assert!(capacity.available_capacity > 0);

    full_flow(&mut p, dir.path(), false).await;
    full_flow(&mut p, dir.path(), true).await;
}

/// After ControllerPublish to node A for writing, node B can neither be published for writing nor
/// write through the server until A is unpublished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_between_two_nodes_and_a_plugin_restart() {
    if !privileged("fencing_between_two_nodes_and_a_plugin_restart", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    let mut a = Plugin::start(dir.path(), &addr, "node-a", "all").await;
    // kubelet asks every node plugin for NodeGetInfo when it registers it; that makes node-a known.
    a.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    // A node that never registered cannot be published to.
    let unknown = ControllerPublishVolumeRequest {
        volume_id: a
            .controller
            .create_volume(create_req("other", 1 << 20, false))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id,
        node_id: "typo-node".into(),
        volume_capability: Some(cap(false, Mode::SingleNodeWriter)),
        ..Default::default()
    };
    assert_eq!(a.controller.controller_publish_volume(unknown).await.unwrap_err().code(), Code::NotFound);
    let id = a
        .controller
        .create_volume(create_req("fenced", 32 << 20, false))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let c = cap(false, Mode::SingleNodeWriter);
    let publish = |node: &str| ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    let ctx =
        a.controller.controller_publish_volume(publish("node-a")).await.unwrap().into_inner().publish_context;
    // Node B's writes are refused by the server itself, whatever its plugin does.
    let opts = ConnectOptions {
        node_id: "node-b".parse().unwrap(),
        token: "tok".into(),
        ..ConnectOptions::default()
    };
    let b_session = Session::connect(&addr, opts).await.unwrap();
    b_session.register_node(&"node-b".parse().unwrap()).await.unwrap();
    let err = a.controller.controller_publish_volume(publish("node-b")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let refused = b_session.open(&id.parse().unwrap(), false).await.unwrap_err();
    assert_eq!(refused.status(), Some(ferrovol_proto::Status::AttachedElsewhere), "{refused}");
    // Nor under the generation node A was given, nor by taking the attachment behind the
    // controller's back without forcing.
    let generation: u64 = ctx["generation"].parse().unwrap();
    let refused = b_session.open_writer(&id.parse().unwrap(), generation).await.unwrap_err();
    assert_eq!(refused.status(), Some(ferrovol_proto::Status::AttachedElsewhere), "{refused}");

    // Stage and publish on A, then kill -9 the plugin: the volume stays mounted and usable.
    let staging = dir.path().join("staging");
    let target = dir.path().join("target");
    std::fs::create_dir_all(&staging).unwrap();
    let (stage, node_publish) = node_reqs(&id, &ctx, &c, &staging, &target);
    // Two stages of one volume at once (attach + mkfs take a while): one runs, the other is ABORTED
    // (the CO retries it); the retry then finds the volume staged.
    let (mut n1, mut n2) = (a.node.clone(), a.node.clone());
    let (r1, r2) = tokio::join!(n1.node_stage_volume(stage.clone()), n2.node_stage_volume(stage.clone()));
    let aborted = [&r1, &r2].iter().filter(|r| r.as_ref().is_err_and(|e| e.code() == Code::Aborted)).count();
    assert!(aborted == 1 && (r1.is_ok() || r2.is_ok()), "{r1:?} {r2:?}");
    a.node.node_stage_volume(stage.clone()).await.unwrap();
    a.node.node_publish_volume(node_publish.clone()).await.unwrap();
    std::fs::write(target.join("before"), b"1").unwrap();
    let mut a = a.restart_hard().await;
    std::fs::write(target.join("after"), b"2").unwrap();
    std::fs::File::open(target.join("after")).unwrap().sync_all().unwrap();
    assert_eq!(std::fs::read(target.join("before")).unwrap(), b"1");
    // The restarted plugin knows what is staged and published.
    a.node.node_stage_volume(stage.clone()).await.unwrap();
    a.node.node_publish_volume(node_publish.clone()).await.unwrap();
    let stats = a
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    // Online expansion: controller then node; the filesystem grows while mounted.
    let expanded = a
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange { required_bytes: 64 << 20, limit_bytes: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 64 << 20);
    assert!(expanded.node_expansion_required);
    let stats_req = NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        ..Default::default()
    };
    let before = a.node.node_get_volume_stats(stats_req.clone()).await.unwrap().into_inner().usage[0].total;
    let expanded = a
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(CapacityRange { required_bytes: 64 << 20, limit_bytes: 0 }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(c.clone()),
            ..Default::default()
        })
        .await;
    // The loop device under the filesystem follows the volume's new size either way.
    let img = dir.path().join(format!("state-node-a/images/{id}.img"));
    let loops = ferrovol_client::host::loops_of(&img);
    let sectors =
        std::fs::read_to_string(format!("/sys/block/{}/size", loops[0].trim_start_matches("/dev/"))).unwrap();
    assert_eq!(sectors.trim().parse::<u64>().unwrap() * 512, 64 << 20);
    if ferrovol_csi::node::has_capability(24) {
        expanded.unwrap();
        let after = a.node.node_get_volume_stats(stats_req).await.unwrap().into_inner().usage[0].total;
        assert!(after > before + (16 << 20), "filesystem did not grow: {before} -> {after}");
    } else {
        // This machine withholds CAP_SYS_RESOURCE even from root, and ext4 needs it to grow online:
        // the grow runs and fails, and the plugin reports resize2fs's error with the reason.
        let e = expanded.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e:?}");
        assert!(e.message().contains("CAP_SYS_RESOURCE"), "{e:?}");
        println!("online ext4 growth not checked: no CAP_SYS_RESOURCE here ({})", e.message());
    }

    a.unpublish_unstage(&id, &target, &staging).await;
    a.controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Now B may take it, and B's writes land.
    let ctx_b =
        a.controller.controller_publish_volume(publish("node-b")).await.unwrap().into_inner().publish_context;
    let generation_b: u64 = ctx_b["generation"].parse().unwrap();
    assert!(generation_b > generation);
    let stale = b_session.open_writer(&id.parse().unwrap(), generation).await.unwrap_err();
    assert_eq!(stale.status(), Some(ferrovol_proto::Status::Fenced), "{stale}");
    let b_vol = b_session.open_writer(&id.parse().unwrap(), generation_b).await.unwrap();
    b_vol.write_at(0, bytes::Bytes::from_static(b"now mine")).await.unwrap();
    b_vol.flush().await.unwrap();
    assert_eq!(&b_vol.read_at(0, 8).await.unwrap()[..], b"now mine");
}

/// kill -9 of the attach process of a staged volume, then of its worker: the mount and the
/// filesystem on it live on. Only when both die at once does its FUSE file answer ENOTCONN: the
/// volume condition says so, a new stage says what to do, and unpublish + unstage still take
/// everything down (a broken mount is still a mount, never "gone") without losing what was fsynced;
/// staging again brings the data back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_attach_process_is_reported_and_cleaned_up() {
    if !privileged("dead_attach_process_is_reported_and_cleaned_up", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "node-a", "all").await;
    p.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    let (id, stage, publish, staging, target) = staged_writer(&mut p, dir.path(), "crashy").await;
    // The capability's mount flags reach the staging mount.
    let staged = ferrovol_client::host::mount_at(&staging).unwrap();
    assert!(staged.options.iter().any(|o| o == "noatime"), "{staged:?}");
    p.node.node_publish_volume(publish.clone()).await.unwrap();
    std::fs::write(target.join("kept"), b"fsynced before the crash").unwrap();
    std::fs::File::open(target.join("kept")).unwrap().sync_all().unwrap();

    // kill -9 of the attach process (the mount's holder), then of its worker: the mount lives on
    // (client/src/fuse/supervise.rs), and the filesystem on it keeps working.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(format!("state-node-a/volumes/{id}.json"))).unwrap(),
    )
    .unwrap();
    let pid = record["attach_pid"].as_u64().unwrap() as u32;
    let image = dir.path().join(format!("state-node-a/images/{id}.img"));
    let serving = || ferrovol_client::host::serving_of(&image).unwrap();
    assert_eq!(serving().holder, pid, "the attach process holds the mount");
    let signal = |pid: u32, sig: i32| {
        // SAFETY: kill(2) with a pid we started and a valid signal.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what} within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let write_synced = |name: &str| {
        let mut f = std::fs::File::create(target.join(name)).unwrap();
        f.write_all(name.as_bytes()).unwrap();
        f.sync_all().unwrap();
    };
    signal(pid, libc::SIGKILL);
    wait_for("a new holder", &|| {
        serving().holder != pid && ferrovol_client::host::pid_alive(serving().holder)
    });
    write_synced("after-holder-kill");
    let worker = serving().worker.unwrap();
    signal(worker, libc::SIGKILL);
    wait_for("a new worker", &|| serving().worker.is_some_and(|w| w != worker));
    write_synced("after-worker-kill");
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"fsynced before the crash");

    // Both at once (stopped first, so neither can replace the other): now the FUSE file dies, and
    // the plugin reports and cleans up the dead mount.
    let s = serving();
    let both = [s.holder, s.worker.unwrap()];
    both.iter().for_each(|&p| signal(p, libc::SIGSTOP));
    both.iter().for_each(|&p| signal(p, libc::SIGKILL));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&image).is_ok() {
        assert!(Instant::now() < deadline, "the FUSE file still answers after its processes died");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stats = p
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await;
    match stats {
        Ok(s) => assert!(s.into_inner().volume_condition.unwrap().abnormal, "a dead attach must be abnormal"),
        Err(e) => assert_eq!(e.code(), Code::Internal, "{e:?}"),
    }
    let again = p.node.node_stage_volume(stage.clone()).await.unwrap_err();
    assert!(again.message().contains("unstage and stage again"), "{again:?}");

    p.unpublish_unstage(&id, &target, &staging).await;
    assert!(!is_mounted(&target) && !is_mounted(&staging) && !is_mounted(&image));

    // Stage again: a new attach process, and the fsynced file is there.
    p.node.node_stage_volume(stage).await.unwrap();
    p.node.node_publish_volume(publish).await.unwrap();
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"fsynced before the crash");
    assert_eq!(std::fs::read(target.join("after-worker-kill")).unwrap(), b"after-worker-kill");
    p.unpublish_unstage(&id, &target, &staging).await;
}

/// A 32 MiB mount volume `name`, created, published read-write to node-a and staged at
/// DIR/staging (NodePublish of the returned request puts it at DIR/target).
async fn staged_writer(
    p: &mut Plugin,
    dir: &Path,
    name: &str,
) -> (String, NodeStageVolumeRequest, NodePublishVolumeRequest, std::path::PathBuf, std::path::PathBuf) {
    let id = p
        .controller
        .create_volume(create_req(name, 32 << 20, false))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let c = cap(false, Mode::SingleNodeWriter);
    let ctx = p
        .controller
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node-a".into(),
            volume_capability: Some(c.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let (staging, target) = (dir.join("staging"), dir.join("target"));
    let (stage, publish) = node_reqs(&id, &ctx, &c, &staging, &target);
    p.node.node_stage_volume(stage.clone()).await.unwrap();
    (id, stage, publish, staging, target)
}

/// The deploy story of identity: the controller with the admin token, the node plugin with the join
/// token. The node enrolls at its first connect and keeps its credential in its state dir; its
/// attach process uses that credential; the whole kubelet flow works. A second plugin claiming the
/// same node id with the join token (a pod on another host with the Secret) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_node_prove_who_they_are() {
    if !privileged("controller_and_node_prove_who_they_are", &["losetup", "mkfs.ext4"]) {
        return;
    }
    const ADMIN: &str = "admin-token-for-the-csi-test";
    const JOIN: &str = "join-token-for-the-csi-test";
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let auth = ferrovol_server::Auth { admin_token: Some(ADMIN.into()), join_token: Some(JOIN.into()) };
    let server = TestServer::start_with_auth(&dir.path().join("data"), "127.0.0.1:0", auth);
    let addr = server.addr.to_string();
    let mut ctl =
        Plugin::start_with_token(dir.path(), &addr, "controller", "controller", ADMIN, "state-ctl").await;
    let mut node = Plugin::start_with_token(dir.path(), &addr, "node-a", "node", JOIN, "state-node-a").await;
    let info = node.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "node-a");
    let cred = std::fs::read_to_string(dir.path().join("state-node-a/credential")).unwrap();
    assert_eq!(cred.trim().len(), 64, "the node keeps its own credential");
    assert!(!dir.path().join("state-ctl/credential").exists(), "the controller uses the admin token");

    let id = ctl
        .controller
        .create_volume(create_req("who", 32 << 20, false))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let c = cap(false, Mode::SingleNodeWriter);
    let publish = ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    let ctx = ctl.controller.controller_publish_volume(publish).await.unwrap().into_inner().publish_context;
    let (staging, target) = (dir.path().join("staging"), dir.path().join("target"));
    std::fs::create_dir_all(&staging).unwrap();
    let (stage, node_publish) = node_reqs(&id, &ctx, &c, &staging, &target);
    node.node.node_stage_volume(stage).await.unwrap();
    node.node.node_publish_volume(node_publish).await.unwrap();
    std::fs::write(target.join("hello"), b"enrolled").unwrap();
    std::fs::File::open(target.join("hello")).unwrap().sync_all().unwrap();
    node.unpublish_unstage(&id, &target, &staging).await;

    // Another plugin says it is node-a, with the join token but not node-a's credential.
    let mut impostor =
        Plugin::start_with_token(dir.path(), &addr, "node-a", "node", JOIN, "state-impostor").await;
    let e = impostor.node.node_get_info(NodeGetInfoRequest {}).await.unwrap_err();
    assert!(e.message().contains("wrong credential"), "{e:?}");

    ctl.controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    ctl.controller.delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
}

/// ControllerPublish, NodeStage and NodePublish of `id` on node-a, as kubelet does them.
async fn attach_volume(
    p: &mut Plugin,
    dir: &Path,
    id: &str,
    block: bool,
    mode: Mode,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let c = cap(block, mode);
    let publish = ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: "node-a".into(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    let ctx = p.controller.controller_publish_volume(publish).await.unwrap().into_inner().publish_context;
    let staging = dir.join(format!("staging-{id}-{block}"));
    let target = dir.join(format!("pods/{id}-{block}/target"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let (stage, publish) = node_reqs(id, &ctx, &c, &staging, &target);
    p.node.node_stage_volume(stage).await.unwrap();
    p.node.node_publish_volume(publish).await.unwrap();
    (staging, target)
}

/// The reverse of [`attach_volume`].
async fn detach_volume(p: &mut Plugin, id: &str, staging: &Path, target: &Path) {
    p.unpublish_unstage(id, target, staging).await;
    let unpublish = ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: "node-a".into(),
        ..Default::default()
    };
    p.controller.controller_unpublish_volume(unpublish).await.unwrap();
}

async fn create_from(p: &mut Plugin, name: &str, block: bool, source: volume_content_source::Type) -> String {
    let req = CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource { r#type: Some(source) }),
        capacity_range: None,
        ..create_req(name, 0, block)
    };
    let v = p.controller.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert!(v.content_source.is_some());
    v.volume_id
}

/// What a test wrote into a volume: a file in a mounted one, bytes at 8 MiB in a raw one.
fn write_payload(target: &Path, block: bool, data: &[u8]) {
    if block {
        let mut f = std::fs::OpenOptions::new().write(true).open(target).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    } else {
        std::fs::write(target.join("payload.bin"), data).unwrap();
        std::fs::File::open(target.join("payload.bin")).unwrap().sync_all().unwrap();
    }
}

fn read_payload(target: &Path, block: bool, len: usize) -> Vec<u8> {
    if block {
        let mut f = std::fs::File::open(target).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        let mut v = vec![0; len];
        f.read_exact(&mut v).unwrap();
        v
    } else {
        std::fs::read(target.join("payload.bin")).unwrap()
    }
}

/// The snapshot the CO makes: CreateSnapshot, then again until it is ready to use.
async fn snapshot_ready(p: &mut Plugin, name: &str, source: &str) -> String {
    let req =
        CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = p.controller.create_snapshot(req.clone()).await.unwrap().into_inner().snapshot.unwrap();
        if s.ready_to_use {
            return s.snapshot_id;
        }
        assert!(Instant::now() < deadline, "snapshot {name} not ready after a minute");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Snapshot -> restore -> the data of the moment; clone -> the data of its moment; the source
/// deleted -> the snapshot still restores; for mount and block. The mount volume is snapshotted
/// while a writer keeps creating and fsyncing files in it, and the restored filesystem is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_clone_mount_and_block() {
    if !privileged("snapshot_restore_and_clone_mount_and_block", &["losetup", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start(dir.path(), &server.addr.to_string(), "node-a", "all").await;
    p.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    let w = Mode::SingleNodeWriter;
    for block in [false, true] {
        let kind = if block { "block" } else { "mount" };
        let src = p
            .controller
            .create_volume(create_req(&format!("src-{kind}"), 64 << 20, block))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let (staging, target) = attach_volume(&mut p, dir.path(), &src, block, w).await;
        let a: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
        let b: Vec<u8> = a.iter().map(|x| !x).collect();
        write_payload(&target, block, &a);
        // A writer keeps going while the snapshot is cut (mount: files, each written and fsynced).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = (!block).then(|| {
            let (stop, target) = (stop.clone(), target.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Acquire) && n < 2000 {
                    let f = target.join(format!("busy-{n}"));
                    std::fs::write(&f, vec![n as u8; 64 << 10]).unwrap();
                    std::fs::File::open(&f).unwrap().sync_all().unwrap();
                    n += 1;
                }
                n
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        let snap = snapshot_ready(&mut p, &format!("snap-{kind}"), &src).await;
        stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = writer {
            assert!(w.join().unwrap() > 0);
        }
        write_payload(&target, block, &b);
        detach_volume(&mut p, &src, &staging, &target).await;

        // Restored: the content of the snapshot's moment.
        let restored = create_from(
            &mut p,
            &format!("restored-{kind}"),
            block,
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: snap.clone(),
            }),
        )
        .await;
        let (rs, rt) = attach_volume(&mut p, dir.path(), &restored, block, w).await;
        assert!(
            read_payload(&rt, block, a.len()) == a,
            "{kind}: restored data differs from the snapshot's moment"
        );
        detach_volume(&mut p, &restored, &rs, &rt).await;
        if !block {
            // Crash-consistent: once mounted (the journal replayed) and unmounted, fsck finds nothing.
            let (bs, bt) = attach_volume(&mut p, dir.path(), &restored, true, w).await;
            let fsck = Command::new("e2fsck").args(["-fn"]).arg(&bt).output().unwrap();
            assert!(
                fsck.status.success(),
                "fsck of the restored filesystem: {}",
                String::from_utf8_lossy(&fsck.stdout)
            );
            detach_volume(&mut p, &restored, &bs, &bt).await;
        }

        // Cloned: the source's content now.
        let clone = create_from(
            &mut p,
            &format!("clone-{kind}"),
            block,
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: src.clone(),
            }),
        )
        .await;
        let (cs, ct) = attach_volume(&mut p, dir.path(), &clone, block, w).await;
        assert!(read_payload(&ct, block, b.len()) == b, "{kind}: clone differs from its source");
        detach_volume(&mut p, &clone, &cs, &ct).await;

        // The source goes; the snapshot still restores.
        p.controller
            .delete_volume(DeleteVolumeRequest { volume_id: src.clone(), ..Default::default() })
            .await
            .unwrap();
        let again = create_from(
            &mut p,
            &format!("again-{kind}"),
            block,
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: snap.clone(),
            }),
        )
        .await;
        let (gs, gt) = attach_volume(&mut p, dir.path(), &again, block, w).await;
        assert!(
            read_payload(&gt, block, a.len()) == a,
            "{kind}: restore after the source was deleted differs"
        );
        detach_volume(&mut p, &again, &gs, &gt).await;
        p.controller
            .delete_snapshot(DeleteSnapshotRequest { snapshot_id: snap, ..Default::default() })
            .await
            .unwrap();
    }
}

/// SINGLE_NODE_SINGLE_WRITER: one target at a time (FAILED_PRECONDITION for a second);
/// SINGLE_NODE_MULTI_WRITER: several. A volume grown before it was staged is expanded on the node
/// without complaint. Beyond --max-volumes-per-node, staging is RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_modes_expand_before_stage_and_the_attach_limit() {
    if !privileged("access_modes_expand_before_stage_and_the_attach_limit", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let mut p = Plugin::start_with_args(
        dir.path(),
        &server.addr.to_string(),
        "node-a",
        "all",
        &["--max-volumes-per-node", "1"],
    )
    .await;
    p.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    for (mode, second_ok) in [(Mode::SingleNodeSingleWriter, false), (Mode::SingleNodeMultiWriter, true)] {
        let id = p
            .controller
            .create_volume(create_req(&format!("mode-{}", mode as i32), 32 << 20, false))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        if mode == Mode::SingleNodeMultiWriter {
            // Grown before it is staged: mkfs uses the new size, and NodeExpand later finds nothing to grow.
            let range = CapacityRange { required_bytes: 48 << 20, limit_bytes: 0 };
            p.controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(range),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let (staging, target) = attach_volume(&mut p, dir.path(), &id, false, mode).await;
        let c = cap(false, mode);
        let second = dir.path().join(format!("pods/{id}-second/target"));
        std::fs::create_dir_all(second.parent().unwrap()).unwrap();
        let (_, publish2) = node_reqs(&id, &HashMap::new(), &c, &staging, &second);
        let r = p.node.node_publish_volume(publish2).await;
        if second_ok {
            r.unwrap();
            assert!(is_mounted(&second));
            let expanded = p
                .node
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    capacity_range: Some(CapacityRange { required_bytes: 48 << 20, limit_bytes: 0 }),
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(c.clone()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(expanded.capacity_bytes, 48 << 20);
            p.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: second.display().to_string(),
                })
                .await
                .unwrap();
        } else {
            assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
            assert!(!is_mounted(&second));
            // The attach limit is 1: another volume cannot be staged while this one is.
            let other = p
                .controller
                .create_volume(create_req("over-the-limit", 8 << 20, false))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id;
            let oc = cap(false, Mode::SingleNodeWriter);
            let os = dir.path().join("staging-over");
            std::fs::create_dir_all(&os).unwrap();
            let (stage, _) = node_reqs(&other, &HashMap::new(), &oc, &os, &dir.path().join("t-over"));
            let e = p.node.node_stage_volume(stage).await.unwrap_err();
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(e.message().contains("max-volumes-per-node"), "{e:?}");
        }
        detach_volume(&mut p, &id, &staging, &target).await;
    }
}

/// `ferrovol-csi --mode attachd` with the node's flags, listening on `socket`, depositing mounts
/// with `keeper`; killed when dropped.
struct Attachd(std::process::Child);

impl Attachd {
    async fn start(dir: &Path, server: &str, socket: &Path, keeper: &Path) -> Attachd {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("attachd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferrovol-csi"))
            .args(["--mode", "attachd", "--node-id", "node-a", "--server", server, "--io-timeout-s", "10"])
            .arg("--state-dir")
            .arg(dir.join("state-node-a"))
            .arg("--attachd")
            .arg(socket)
            .arg("--keeper")
            .arg(keeper)
            .env("FERROVOL_TOKEN", "tok")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the attach daemon did not listen on {}", socket.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Attachd(child)
    }
}

impl Drop for Attachd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Kubernetes layout of issue 10: the node plugin attaches through the attach daemon (its own
/// DaemonSet) and serves the keeper. kill -9 of the node plugin touches no mount; the death of the
/// attach daemon's whole container (the daemon, the holder and the worker at once) does not either:
/// the keeper holds the FUSE connection, and the next daemon adopts the mount. The filesystem on
/// it keeps every fsynced file and takes new ones; unstage works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_outlive_the_node_plugin_and_the_attach_daemon() {
    if !privileged("mounts_outlive_the_node_plugin_and_the_attach_daemon", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    let (sock, keeper) = (dir.path().join("attachd.sock"), dir.path().join("keeper.sock"));
    let (sock_s, keeper_s) = (sock.display().to_string(), keeper.display().to_string());
    let mut p = Plugin::start_with_args(
        dir.path(),
        &addr,
        "node-a",
        "all",
        &["--attachd", &sock_s, "--keeper", &keeper_s],
    )
    .await;
    let mut daemon = Attachd::start(dir.path(), &addr, &sock, &keeper).await;
    p.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    let (id, stage, publish, staging, target) = staged_writer(&mut p, dir.path(), "kept").await;
    p.node.node_publish_volume(publish.clone()).await.unwrap();
    let write_synced = |name: &str| {
        let mut f = std::fs::File::create(target.join(name)).unwrap();
        f.write_all(name.as_bytes()).unwrap();
        f.sync_all().unwrap();
    };
    write_synced("before");

    // The attach process is the daemon's child, not the plugin's.
    let image = dir.path().join(format!("state-node-a/images/{id}.img"));
    let serving = || ferrovol_client::host::serving_of(&image).unwrap();
    let parent = |pid: u32| -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(parent(serving().holder), daemon.0.id(), "the attach daemon started the mount's holder");
    let kept_twice = || {
        let canon = std::fs::canonicalize(&image).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = ferrovol_client::fuse::keep::list(&keeper).unwrap_or_default();
            if list.iter().any(|k| k.path == canon && k.depositors == 2) {
                return;
            }
            assert!(Instant::now() < deadline, "the keeper does not hold the mount twice: {list:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    kept_twice();

    // 1. kill -9 of the node plugin (the keeper with it): the mount does not notice; the next
    //    plugin's keeper gets the mount deposited again.
    p = p.restart_hard().await;
    write_synced("after-plugin-kill");
    kept_twice();

    // 2. The attach daemon's container dies: the daemon, the holder and the worker at once.
    let s = serving();
    let all = [daemon.0.id(), s.holder, s.worker.unwrap()];
    let signal = |pid: u32, sig: i32| {
        // SAFETY: kill(2) with a pid we know and a valid signal.
        unsafe { libc::kill(pid as i32, sig) };
    };
    all.iter().for_each(|&p| signal(p, libc::SIGSTOP));
    all.iter().for_each(|&p| signal(p, libc::SIGKILL));
    let _ = daemon.0.wait();
    // The FUSE file is still mounted, and the keeper holds it as an orphan (no process of its own
    // left; its requests wait for a worker).
    let canon = std::fs::canonicalize(&image).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = ferrovol_client::fuse::keep::list(&keeper).unwrap();
        if list.iter().any(|k| k.path == canon && k.depositors == 0 && k.orphan_ms.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "the keeper does not hold the mount as an orphan: {list:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ferrovol_client::host::mount_at(&image).is_some());
    daemon = Attachd::start(dir.path(), &addr, &sock, &keeper).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !serving().worker.is_some_and(|w| w != s.worker.unwrap() && ferrovol_client::host::pid_alive(w)) {
        assert!(Instant::now() < deadline, "no new worker within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write_synced("after-attachd-death");
    for name in ["before", "after-plugin-kill"] {
        assert_eq!(std::fs::read(target.join(name)).unwrap(), name.as_bytes());
    }
    let stats = p
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal, "the adopted mount is healthy");

    // 3. Unstage: unmounted, its processes gone, the keeper lets go.
    let s = serving();
    p.unpublish_unstage(&id, &target, &staging).await;
    assert!(!is_mounted(&image));
    assert!(
        !ferrovol_client::host::pid_alive(s.holder)
            && !s.worker.is_some_and(ferrovol_client::host::pid_alive)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ferrovol_client::fuse::keep::list(&keeper).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the keeper still holds the unstaged mount");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stage again through the new daemon: the files are there.
    p.node.node_stage_volume(stage).await.unwrap();
    p.node.node_publish_volume(publish).await.unwrap();
    assert_eq!(std::fs::read(target.join("after-attachd-death")).unwrap(), b"after-attachd-death");
    p.unpublish_unstage(&id, &target, &staging).await;
    drop(daemon);
}

/// ReadWriteMany: with `type: auto`, a MULTI_NODE_MULTI_WRITER volume is an fs volume; it is
/// published to two nodes at once (no writer attachment), staged as a FUSE mount of the server's
/// files on each, bind-mounted into a "pod" on each, and both write and read the same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fs_volume_is_shared_by_two_nodes() {
    if !privileged("an_fs_volume_is_shared_by_two_nodes", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_owned());
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    let mut a = Plugin::start(dir.path(), &addr, "node-a", "all").await;
    let mut b = Plugin::start(dir.path(), &addr, "node-b", "node").await;
    a.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    b.node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    let rwx = cap(false, Mode::MultiNodeMultiWriter);
    let mut req = create_req("shared", 64 << 20, false);
    req.volume_capabilities = vec![rwx.clone()];
    let vol = a.controller.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(vol.volume_context.get("type").map(String::as_str), Some("fs"), "{vol:?}");
    // Idempotent; the same name asked as a block volume is another volume: ALREADY_EXISTS. A
    // block volume has one writer node: MULTI_NODE_MULTI_WRITER with type: block is refused.
    a.controller.create_volume(req.clone()).await.unwrap();
    let mut as_block = req.clone();
    as_block.parameters.insert("type".into(), "block".into());
    inv(a.controller.create_volume(as_block.clone()).await, "a multi-writer block volume");
    as_block.volume_capabilities = vec![cap(false, Mode::SingleNodeWriter)];
    let err = a.controller.create_volume(as_block).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // An fs volume is not a raw block device.
    let mut raw = req.clone();
    raw.name = "raw".into();
    raw.volume_capabilities = vec![cap(true, Mode::MultiNodeMultiWriter)];
    inv(a.controller.create_volume(raw).await, "raw block fs volume");
    let id = vol.volume_id.clone();
    let info = Session::connect(&addr, ConnectOptions { token: "tok".into(), ..ConnectOptions::default() })
        .await
        .unwrap()
        .stat_volume(&id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(info.kind, ferrovol_proto::codec::VOLUME_KIND_FS);

    // Published for writing to both nodes: no attachment, no generation.
    let mut contexts = Vec::new();
    for node in ["node-a", "node-b"] {
        let publish = ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node.into(),
            volume_capability: Some(rwx.clone()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        };
        let ctx = a.controller.controller_publish_volume(publish).await.unwrap().into_inner().publish_context;
        assert_eq!(ctx.get("readonly").map(String::as_str), Some("false"));
        assert!(!ctx.contains_key("generation"), "{ctx:?}");
        contexts.push(ctx);
    }
    let mut paths = Vec::new();
    for (plugin, (node, ctx)) in [&mut a, &mut b].into_iter().zip(["a", "b"].iter().zip(&contexts)) {
        let staging = dir.path().join(format!("staging-{node}"));
        let target = dir.path().join(format!("target-{node}"));
        std::fs::create_dir_all(&staging).unwrap();
        let (mut stage, mut publish) = node_reqs(&id, ctx, &rwx, &staging, &target);
        stage.volume_context = vol.volume_context.clone();
        publish.volume_context = vol.volume_context.clone();
        plugin.node.node_stage_volume(stage.clone()).await.unwrap();
        // Idempotent.
        plugin.node.node_stage_volume(stage).await.unwrap();
        plugin.node.node_publish_volume(publish.clone()).await.unwrap();
        plugin.node.node_publish_volume(publish).await.unwrap();
        let m = ferrovol_client::host::mount_at(&staging).unwrap();
        assert!(m.fstype.starts_with("fuse") && m.source == format!("ferrovol:{id}"), "{m:?}");
        paths.push((staging, target));
    }
    let (ta, tb) = (&paths[0].1, &paths[1].1);
    // Both nodes write, both read.
    std::fs::write(ta.join("from-a"), b"written on a").unwrap();
    std::fs::write(tb.join("from-b"), b"written on b").unwrap();
    assert_eq!(std::fs::read(tb.join("from-a")).unwrap(), b"written on a");
    assert_eq!(std::fs::read(ta.join("from-b")).unwrap(), b"written on b");
    std::fs::OpenOptions::new().append(true).open(tb.join("from-a")).unwrap().write_all(b", then b").unwrap();
    assert_eq!(std::fs::read(ta.join("from-a")).unwrap(), b"written on a, then b");
    // Stats come from statfs of the shared filesystem.
    let stats = b
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: tb.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    let bytes = stats.usage.iter().find(|u| u.unit == pb_unit_bytes()).unwrap();
    assert!(bytes.total > 32 << 20 && bytes.used > 0, "{bytes:?}");
    // A snapshot of the mounted, shared volume, restored with `type: auto` for one node: a
    // restore is of its source's kind (an fs volume), with the files as they were.
    let snap = snapshot_ready(&mut a, "shared-snap", &id).await;
    let snap_src = || {
        volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: snap.clone(),
        })
    };
    let r = a
        .controller
        .create_volume(CreateVolumeRequest {
            volume_content_source: Some(VolumeContentSource { r#type: Some(snap_src()) }),
            capacity_range: None,
            ..create_req("shared-restored", 0, false)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(r.volume_context.get("type").map(String::as_str), Some("fs"), "{r:?}");
    assert!(r.content_source.is_some(), "{r:?}");
    let restored = r.volume_id.clone();
    {
        let rwo = cap(false, Mode::SingleNodeWriter);
        let publish = ControllerPublishVolumeRequest {
            volume_id: restored.clone(),
            node_id: "node-a".into(),
            volume_capability: Some(rwo.clone()),
            volume_context: r.volume_context.clone(),
            ..Default::default()
        };
        let ctx = a.controller.controller_publish_volume(publish).await.unwrap().into_inner().publish_context;
        let (staging, target) = (dir.path().join("staging-r"), dir.path().join("target-r"));
        std::fs::create_dir_all(&staging).unwrap();
        let (mut stage, mut publish) = node_reqs(&restored, &ctx, &rwo, &staging, &target);
        stage.volume_context = r.volume_context.clone();
        publish.volume_context = r.volume_context.clone();
        a.node.node_stage_volume(stage).await.unwrap();
        a.node.node_publish_volume(publish).await.unwrap();
        assert_eq!(std::fs::read(target.join("from-a")).unwrap(), b"written on a, then b");
        a.unpublish_unstage(&restored, &target, &staging).await;
        let unpublish = ControllerUnpublishVolumeRequest {
            volume_id: restored.clone(),
            node_id: "node-a".into(),
            ..Default::default()
        };
        a.controller.controller_unpublish_volume(unpublish).await.unwrap();
    }
    // Asked for as a block volume, an fs snapshot is refused, by name.
    let mut as_block = CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource { r#type: Some(snap_src()) }),
        capacity_range: None,
        ..create_req("restored-as-block", 0, true)
    };
    as_block.parameters.insert("type".into(), "block".into());
    let err = a.controller.create_volume(as_block).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("is of an fs volume"), "{err:?}");
    // Expansion is the server's: in place where it may grow a mounted ext4 (CAP_SYS_RESOURCE),
    // else FAILED_PRECONDITION ("in use", as the spec says for a plugin that cannot grow it
    // online) until no node has it mounted.
    let expand = ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 128 << 20, limit_bytes: 0 }),
        ..Default::default()
    };
    let online = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| u64::from_str_radix(v.trim(), 16).unwrap()))
        .unwrap()
        & (1 << 24)
        != 0;
    if online {
        let grown = a.controller.controller_expand_volume(expand.clone()).await.unwrap().into_inner();
        assert!(!grown.node_expansion_required && grown.capacity_bytes == 128 << 20, "{grown:?}");
    } else {
        let err = a.controller.controller_expand_volume(expand.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("CAP_SYS_RESOURCE"), "{err:?}");
    }
    // Unstage while published is refused; after unpublish, unstage unmounts, and the other node
    // still works.
    let err = a
        .node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: paths[0].0.display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    a.unpublish_unstage(&id, &paths[0].1, &paths[0].0).await;
    assert!(!is_mounted(&paths[0].0) && !is_mounted(&paths[0].1));
    assert_eq!(std::fs::read(tb.join("from-b")).unwrap(), b"written on b");
    b.unpublish_unstage(&id, &paths[1].1, &paths[1].0).await;
    assert!(!is_mounted(&paths[1].0) && !is_mounted(&paths[1].1));
    for node in ["node-a", "node-b"] {
        let unpublish = ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node.into(),
            ..Default::default()
        };
        a.controller.controller_unpublish_volume(unpublish).await.unwrap();
    }
    // Mounted nowhere: the server grows it (unmounted, or in place). The mount processes'
    // connections close just after their unmount: FAILED_PRECONDITION until then.
    let start = std::time::Instant::now();
    let grown = loop {
        match a.controller.controller_expand_volume(expand.clone()).await {
            Err(e) if e.code() == Code::FailedPrecondition && start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            r => break r.unwrap().into_inner(),
        }
    };
    assert!(!grown.node_expansion_required && grown.capacity_bytes == 128 << 20, "{grown:?}");
    a.controller
        .delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
        .await
        .unwrap();
}

fn pb_unit_bytes() -> i32 {
    ferrovol_proto::csi::volume_usage::Unit::Bytes as i32
}
