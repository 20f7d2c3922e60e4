//! `ferrovol volume ...`

use ferrovol_proto::{format_size, VolumeInfo};

use super::{Global, VolumeCmd};

fn json(v: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "name": v.name.as_str(),
        "kind": "block",
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
        VolumeCmd::Create { name, size } => {
            let v = session.create_volume(&name, size).await?;
            println!("created volume {} ({})", v.name, format_size(v.size));
        }
        VolumeCmd::List { json: as_json } => {
            let vols = session.list_volumes().await?;
            if as_json {
                let all: Vec<_> = vols.iter().map(json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:<32} {:>12} {:>12}  WRITER", "NAME", "SIZE", "ALLOCATED");
                for v in vols {
                    println!(
                        "{:<32} {:>12} {:>12}  {}",
                        v.name.as_str(),
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
                println!("kind:       block");
                println!("size:       {} ({} bytes)", format_size(v.size), v.size);
                println!("allocated:  {} ({} bytes)", format_size(v.allocated), v.allocated);
                println!("writer:     {}", v.owner.as_ref().map(|o| o.as_str()).unwrap_or("-"));
                for (k, val) in &v.labels {
                    println!("label:      {k}={val:?}");
                }
                println!("generation: {}", v.generation);
                println!("created:    {} ms since the epoch", v.created_unix_ms);
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
