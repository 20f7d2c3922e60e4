//! `ferrovol volume ...` and `ferrovol snapshot ...`

use ferrovol_proto::{format_size, Labels, SnapshotInfo, VolumeInfo, VolumeSource};

use super::{Global, SnapshotCmd, VolumeCmd};

fn kind_name(kind: u8) -> &'static str {
    if kind == ferrovol_proto::codec::VOLUME_KIND_FS {
        "fs"
    } else {
        "block"
    }
}

fn snapshot_json(s: &SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "name": s.name.as_str(),
        "kind": kind_name(s.kind),
        "source": s.source.as_str(),
        "size": s.size,
        "allocated": s.allocated,
        "created_unix_ms": s.created_unix_ms,
        "ready": s.ready,
        "copied_bytes": s.copied_bytes,
        "labels": s.labels,
    })
}

fn progress(s: &SnapshotInfo) -> String {
    if s.ready {
        "ready".into()
    } else {
        format!("copying {}%", s.copied_bytes * 100 / s.size.max(1))
    }
}

pub async fn snapshot(global: &Global, cmd: SnapshotCmd) -> anyhow::Result<()> {
    let session = global.connect(1).await?;
    match cmd {
        SnapshotCmd::Create { name, volume, wait, json } => {
            let mut s = session.create_snapshot(&name, &volume, Labels::new()).await?;
            let started = std::time::Instant::now();
            while wait && !s.ready {
                if !json {
                    eprint!("\rsnapshot {name}: {}", progress(&s));
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                s = match session.stat_snapshot(&name).await {
                    Ok(s) => s,
                    Err(e) if e.status() == Some(ferrovol_proto::Status::NotFound) => anyhow::bail!(
                        "snapshot {name} is gone: its copy failed (the server's log says why) or it was deleted"
                    ),
                    Err(e) => return Err(e.into()),
                };
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot_json(&s))?);
            } else {
                if wait && started.elapsed().as_millis() > 200 {
                    eprintln!();
                }
                println!(
                    "created snapshot {} of volume {} ({}, {})",
                    s.name,
                    s.source,
                    format_size(s.size),
                    progress(&s)
                );
            }
        }
        SnapshotCmd::List { volume, json } => {
            let snaps = session.list_snapshots(volume.as_ref()).await?;
            if json {
                let all: Vec<_> = snaps.iter().map(snapshot_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<32} {:<32} {:<5} {:>12} {:>12}  STATE",
                    "NAME", "VOLUME", "KIND", "SIZE", "ALLOCATED"
                );
                for s in snaps {
                    println!(
                        "{:<32} {:<32} {:<5} {:>12} {:>12}  {}",
                        s.name.as_str(),
                        s.source.as_str(),
                        kind_name(s.kind),
                        format_size(s.size),
                        format_size(s.allocated),
                        progress(&s)
                    );
                }
            }
        }
        SnapshotCmd::Stat { name, json } => {
            let s = session.stat_snapshot(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot_json(&s))?);
            } else {
                println!("name:       {}", s.name);
                println!("volume:     {}", s.source);
                println!("kind:       {}", kind_name(s.kind));
                println!("size:       {} ({} bytes)", format_size(s.size), s.size);
                println!("allocated:  {} ({} bytes)", format_size(s.allocated), s.allocated);
                println!("state:      {}", progress(&s));
                println!("created:    {}", ferrovol_proto::format_unix_ms(s.created_unix_ms));
            }
        }
        SnapshotCmd::Delete { name } => {
            session.delete_snapshot(&name).await?;
            println!("deleted snapshot {name}");
        }
    }
    Ok(())
}

fn kind(v: &VolumeInfo) -> &'static str {
    kind_name(v.kind)
}

fn json(v: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "name": v.name.as_str(),
        "kind": kind(v),
        "size": v.size,
        "allocated": v.allocated,
        "created_unix_ms": v.created_unix_ms,
        "generation": v.generation,
        "owner": v.owner.as_ref().map(|o| o.as_str()),
        "labels": v.labels,
    })
}

pub async fn run(global: &Global, cmd: VolumeCmd) -> anyhow::Result<()> {
    let session = global.connect(1).await?;
    match cmd {
        VolumeCmd::Create { name, size, kind: volume_kind, from_snapshot, from_volume } => {
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(VolumeSource::Snapshot(s)),
                (None, Some(v)) => Some(VolumeSource::Volume(v)),
                (None, None) => None,
            };
            let from = match &source {
                Some(VolumeSource::Snapshot(s)) => format!(" from snapshot {s}"),
                Some(VolumeSource::Volume(v)) => format!(" as a clone of volume {v}"),
                None => String::new(),
            };
            let k = match (volume_kind, &source) {
                (Some(super::VolumeKind::Block), _) | (None, None) => {
                    ferrovol_proto::codec::VOLUME_KIND_BLOCK
                }
                (Some(super::VolumeKind::Fs), _) => ferrovol_proto::codec::VOLUME_KIND_FS,
                // The source's kind: the server refuses any other.
                (None, Some(VolumeSource::Snapshot(s))) => session.stat_snapshot(s).await?.kind,
                (None, Some(VolumeSource::Volume(v))) => session.stat_volume(v).await?.kind,
            };
            let v = session.create_volume_of_kind(&name, k, size.unwrap_or(0), Labels::new(), source).await?;
            println!("created {} volume {} ({}){from}", kind(&v), v.name, format_size(v.size));
        }
        VolumeCmd::List { json: as_json } => {
            let vols = session.list_volumes().await?;
            if as_json {
                let all: Vec<_> = vols.iter().map(json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:<32} {:<5} {:>12} {:>12}  WRITER", "NAME", "KIND", "SIZE", "ALLOCATED");
                for v in vols {
                    println!(
                        "{:<32} {:<5} {:>12} {:>12}  {}",
                        v.name.as_str(),
                        kind(&v),
                        format_size(v.size),
                        format_size(v.allocated),
                        v.owner.as_ref().map(|o| o.as_str()).unwrap_or("-")
                    );
                }
            }
        }
        VolumeCmd::Stat { name, json: as_json } => {
            let v = session.stat_volume(&name).await?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&json(&v))?);
            } else {
                println!("name:       {}", v.name);
                println!("kind:       {}", kind(&v));
                println!("size:       {} ({} bytes)", format_size(v.size), v.size);
                println!("allocated:  {} ({} bytes)", format_size(v.allocated), v.allocated);
                match &v.owner {
                    Some(o) => println!(
                        "writer:     {o} (since {})",
                        ferrovol_proto::format_unix_ms(v.attached_unix_ms)
                    ),
                    None => println!("writer:     -"),
                }
                for (k, val) in &v.labels {
                    println!("label:      {k}={val:?}");
                }
                println!("generation: {}", v.generation);
                println!("created:    {}", ferrovol_proto::format_unix_ms(v.created_unix_ms));
            }
        }
        VolumeCmd::Resize { name, size } => {
            let v = session.resize_volume(&name, size).await?;
            println!("volume {} is now {}", v.name, format_size(v.size));
        }
        VolumeCmd::Delete { name, force } => {
            if force {
                session.delete_volume_forced(&name).await?;
            } else {
                session.delete_volume(&name).await?;
            }
            println!("deleted volume {name}");
        }
    }
    Ok(())
}
