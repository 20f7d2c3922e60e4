//! The server's Prometheus series, served on `--metrics-listen` (server/README.md, "Metrics").
//!
//! Labels come from fixed sets (opcode names, opcode classes, status names, refusal reasons) and
//! volume names: the series grow with the volumes (per volume, a counter per opcode used and a
//! histogram per opcode class). A request on an open volume updates series cached in its handle
//! (`VolumeMeter`), so the data path takes no map lookup; only a failure looks its series up.
//! Nothing is recorded unless an endpoint serves the metrics (`register`).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ferrovol_proto::{Opcode, Status};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    volume: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    volume: String,
    class: &'static str,
}

/// The class of an opcode, for the latency histograms (a histogram per opcode would be 24 series
/// for each of some 50 opcodes of each volume).
fn class_of(op: Opcode) -> &'static str {
    match op {
        Opcode::Read | Opcode::FsRead => "read",
        Opcode::Write | Opcode::WriteZeroes | Opcode::FsWrite | Opcode::FsCopyRange => "write",
        Opcode::Flush | Opcode::FsFsync | Opcode::FsFlush => "sync",
        Opcode::Trim | Opcode::FsFallocate => "trim",
        _ => "metadata",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    volume: String,
    op: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    volume: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriterLabels {
    pub volume: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(ferrovol_proto::metrics::latency_buckets())
}

/// Every series of the server.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<OpLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    seconds: Histograms<ClassLabels>,
    bytes: Family<BytesLabels, Counter>,
    /// Connections open now.
    pub connections: Gauge,
    refused: Family<ReasonLabels, Counter>,
    /// Store: filesystem size and free space of the data dir, sizes given to the volumes, volumes.
    pub store_capacity: Gauge<u64, AtomicU64>,
    pub store_free: Gauge<u64, AtomicU64>,
    pub store_provisioned: Gauge<u64, AtomicU64>,
    pub store_volumes: Gauge,
    /// Per volume: size and allocated bytes; the writer attachment (1 for its holder).
    pub volume_size: Family<VolumeLabels, Gauge<u64, AtomicU64>>,
    pub volume_allocated: Family<VolumeLabels, Gauge<u64, AtomicU64>>,
    pub writer: Family<WriterLabels, Gauge>,
    meters: Mutex<HashMap<String, Arc<VolumeMeter>>>,
}

/// The process's metrics (registered with `register` when an endpoint serves them).
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether an endpoint serves the metrics (else nothing is recorded).
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        requests: Family::default(),
        errors: Family::default(),
        seconds: Family::new_with_constructor(latency_histogram),
        bytes: Family::default(),
        connections: Gauge::default(),
        refused: Family::default(),
        store_capacity: Gauge::default(),
        store_free: Gauge::default(),
        store_provisioned: Gauge::default(),
        store_volumes: Gauge::default(),
        volume_size: Family::default(),
        volume_allocated: Family::default(),
        writer: Family::default(),
        meters: Mutex::default(),
    })
}

impl Metrics {
    /// Adds every series to `registry` (prefix `ferrovol_server_` / `ferrovol_store_` /
    /// `ferrovol_volume_`).
    pub fn register(&'static self, registry: &mut Registry) {
        ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
        let server = registry.sub_registry_with_prefix("ferrovol_server");
        server.register(
            "requests",
            "Requests on open volumes (block I/O and file operations), by volume and opcode",
            self.requests.clone(),
        );
        server.register(
            "request_errors",
            "Requests that failed, by volume, opcode and status",
            self.errors.clone(),
        );
        server.register_with_unit(
            "request_duration",
            "Service time of requests on open volumes, from parsed to answered (a change to a frozen fs \
             volume includes its wait for the thaw), by volume and opcode class (read, write, sync, trim, \
             metadata)",
            Unit::Seconds,
            self.seconds.clone(),
        );
        server.register_with_unit(
            "data",
            "Payload bytes read and written (block I/O, file reads, small files read with their open, \
             file writes), by volume",
            Unit::Bytes,
            self.bytes.clone(),
        );
        server.register("connections", "Connections open now", self.connections.clone());
        server.register(
            "connections_refused",
            "Connections the server refused or closed, by reason",
            self.refused.clone(),
        );
        let store = registry.sub_registry_with_prefix("ferrovol_store");
        store.register_with_unit(
            "capacity",
            "Size of the filesystem holding the data dir",
            Unit::Bytes,
            self.store_capacity.clone(),
        );
        store.register_with_unit(
            "free",
            "Free space of that filesystem",
            Unit::Bytes,
            self.store_free.clone(),
        );
        store.register_with_unit(
            "provisioned",
            "Sizes given to the volumes, summed (thin: may exceed the capacity)",
            Unit::Bytes,
            self.store_provisioned.clone(),
        );
        store.register("volumes", "Volumes in the store", self.store_volumes.clone());
        let volume = registry.sub_registry_with_prefix("ferrovol_volume");
        volume.register_with_unit("size", "A volume's size", Unit::Bytes, self.volume_size.clone());
        volume.register_with_unit(
            "allocated",
            "Storage a volume's data file occupies",
            Unit::Bytes,
            self.volume_allocated.clone(),
        );
        volume.register(
            "writer_attached",
            "1 for the node that holds a block volume's writer attachment",
            self.writer.clone(),
        );
    }

    /// The series of volume `name`, for an open handle to keep.
    pub fn volume(&'static self, name: &str) -> Arc<VolumeMeter> {
        let mut meters = self.meters.lock().unwrap_or_else(|p| p.into_inner());
        meters
            .entry(name.to_owned())
            .or_insert_with(|| {
                let bytes = |direction| {
                    self.bytes.get_or_create(&BytesLabels { volume: name.to_owned(), direction }).clone()
                };
                Arc::new(VolumeMeter {
                    volume: name.to_owned(),
                    ops: std::array::from_fn(|_| OnceLock::new()),
                    read: bytes("read"),
                    written: bytes("write"),
                })
            })
            .clone()
    }

    /// A connection refused for `reason` ("over_capacity", "handshake_timeout", "auth_failed"...).
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Drops volume `name`'s series (deleted).
    pub fn forget(&self, name: &str) {
        self.meters.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        for direction in ["read", "write"] {
            self.bytes.remove(&BytesLabels { volume: name.to_owned(), direction });
        }
        for class in ["read", "write", "sync", "trim", "metadata"] {
            self.seconds.remove(&ClassLabels { volume: name.to_owned(), class });
        }
        for op in Opcode::ALL {
            let labels = OpLabels { volume: name.to_owned(), op: op.name() };
            self.requests.remove(&labels);
            for status in Status::ALL {
                self.errors.remove(&ErrorLabels {
                    volume: name.to_owned(),
                    op: op.name(),
                    status: status_name(status),
                });
            }
        }
    }
}

/// The series of one volume, cached per opcode.
#[derive(Debug)]
pub struct VolumeMeter {
    volume: String,
    /// By opcode byte: its counter and its class's histogram (`None`: not an opcode).
    ops: [OnceLock<Option<(Counter, Histogram)>>; 256],
    read: Counter,
    written: Counter,
}

impl VolumeMeter {
    /// A request with opcode `op` was answered after `took`: `status` is `None` when it succeeded;
    /// `read` and `written` are its payload bytes.
    pub fn record(&self, op: u8, status: Option<Status>, took: Duration, read: u64, written: u64) {
        let m = metrics();
        let Some((count, seconds)) = self.ops[usize::from(op)].get_or_init(|| {
            let opcode = Opcode::try_from(op).ok()?;
            let labels = OpLabels { volume: self.volume.clone(), op: opcode.name() };
            let class = ClassLabels { volume: self.volume.clone(), class: class_of(opcode) };
            Some((m.requests.get_or_create(&labels).clone(), m.seconds.get_or_create(&class).clone()))
        }) else {
            return;
        };
        count.inc();
        seconds.observe(took.as_secs_f64());
        if let Some(status) = status {
            let op = Opcode::try_from(op).map_or("unknown", Opcode::name);
            m.errors
                .get_or_create(&ErrorLabels { volume: self.volume.clone(), op, status: status_name(status) })
                .inc();
        }
        if read > 0 {
            self.read.inc_by(read);
        }
        if written > 0 {
            self.written.inc_by(written);
        }
    }
}

/// A status as a label value: lower case, words joined by `_`.
pub fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::BadRequest => "bad_request",
        Status::UnsupportedVersion => "unsupported_version",
        Status::AuthFailed => "auth_failed",
        Status::UnknownOpcode => "unknown_opcode",
        Status::Checksum => "checksum",
        Status::TooLarge => "too_large",
        Status::InvalidName => "invalid_name",
        Status::NotFound => "not_found",
        Status::AlreadyExists => "already_exists",
        Status::OutOfRange => "out_of_range",
        Status::ReadOnly => "read_only",
        Status::Fenced => "fenced",
        Status::BadHandle => "bad_handle",
        Status::NotReady => "not_ready",
        Status::Io => "io",
        Status::NoSpace => "no_space",
        Status::ShuttingDown => "shutting_down",
        Status::AttachedElsewhere => "attached_elsewhere",
        Status::InvalidArgument => "invalid_argument",
        Status::Busy => "busy",
        Status::Internal => "internal",
        Status::Forbidden => "forbidden",
        Status::Replaced => "replaced",
        Status::Errno => "errno",
    }
}

/// Sets the store's gauges from `store` (before a scrape): capacity, and each volume's size,
/// allocation and writer.
pub fn refresh_store(store: &crate::store::Store) {
    let m = metrics();
    if let Ok(st) = store.stat() {
        m.store_capacity.set(st.total_bytes);
        m.store_free.set(st.free_bytes);
        m.store_provisioned.set(st.provisioned_bytes);
        m.store_volumes.set(i64::try_from(st.volumes).unwrap_or(i64::MAX));
    }
    // Deleted volumes' series go with them.
    m.volume_size.clear();
    m.volume_allocated.clear();
    m.writer.clear();
    let mut after = None;
    loop {
        let (page, more) = store.list(after.as_ref(), ferrovol_proto::limits::LIST_ENTRIES_MAX);
        for v in &page {
            let labels = VolumeLabels {
                volume: v.name.to_string(),
                kind: if v.kind == ferrovol_proto::codec::VOLUME_KIND_FS { "fs" } else { "block" },
            };
            m.volume_size.get_or_create(&labels).set(v.size);
            m.volume_allocated.get_or_create(&labels).set(v.allocated);
            if let Some(owner) = &v.owner {
                m.writer
                    .get_or_create(&WriterLabels { volume: v.name.to_string(), node: owner.to_string() })
                    .set(1);
            }
        }
        match (more, page.last()) {
            (true, Some(last)) => after = Some(last.name.clone()),
            _ => break,
        }
    }
}
