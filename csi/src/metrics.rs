//! The CSI plugin's Prometheus series, served on `--metrics-listen` (csi/README.md, "Metrics"):
//! every gRPC call by method and code, and its latency by method. Labels come from fixed sets
//! (the driver's methods, gRPC codes).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug)]
struct Metrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        calls: Family::default(),
        // 1 ms to about 2 min: CSI calls run mkfs, mounts and copies, and the sidecars wait 60-120 s.
        seconds: Family::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-3, 2.0, 18))
        }),
    })
}

/// Adds the series to `registry` (prefix `ferrovol_csi_`).
pub fn register(registry: &mut Registry) {
    let m = metrics();
    let csi = registry.sub_registry_with_prefix("ferrovol_csi");
    csi.register("rpcs", "gRPC calls served, by method and gRPC code", m.calls.clone());
    csi.register_with_unit(
        "rpc_duration",
        "Time to answer a gRPC call, by method",
        Unit::Seconds,
        m.seconds.clone(),
    );
}

/// A call of `method` answered with `code` after `took`.
pub fn record(method: &'static str, code: tonic::Code, took: std::time::Duration) {
    let m = metrics();
    m.calls.get_or_create(&CallLabels { method, code: code_name(code) }).inc();
    m.seconds.get_or_create(&MethodLabels { method }).observe(took.as_secs_f64());
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
