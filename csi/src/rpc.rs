//! One log line per RPC, inside a span per RPC: method, volume (or snapshot) id, gRPC code and
//! message, duration. Requests themselves are never logged, so secrets (the `secrets` maps, mount
//! flags) cannot leak into the log. Failures are WARN; successes INFO for RPCs that change
//! something, DEBUG for the polling ones (Probe, capabilities, stats, lists), which kubelet and the
//! sidecars call all the time.

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::{debug, info, info_span, warn, Instrument};

/// RPCs that only read: logged at DEBUG when they succeed.
const QUIET: [&str; 11] = [
    "Probe",
    "GetPluginInfo",
    "GetPluginCapabilities",
    "ControllerGetCapabilities",
    "NodeGetCapabilities",
    "NodeGetInfo",
    "NodeGetVolumeStats",
    "GetCapacity",
    "ListVolumes",
    "ListSnapshots",
    "ValidateVolumeCapabilities",
];

/// Runs one RPC's handler inside its span and logs its outcome.
pub async fn logged<T>(
    method: &'static str,
    id: &str,
    handler: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let span = info_span!("rpc", method, id);
    let started = Instant::now();
    // A call whose caller gave up (deadline, cancel) is dropped mid-way: counted as CANCELLED.
    struct Unanswered(&'static str, Instant, bool);
    impl Drop for Unanswered {
        fn drop(&mut self) {
            if !self.2 {
                crate::metrics::record(self.0, tonic::Code::Cancelled, self.1.elapsed());
            }
        }
    }
    let mut pending = Unanswered(method, started, false);
    let result = handler.instrument(span.clone()).await;
    pending.2 = true;
    let took = started.elapsed();
    crate::metrics::record(method, result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok), took);
    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    let _in = span.enter();
    match &result {
        Ok(_) if QUIET.contains(&method) => debug!(method, id, ms, "ok"),
        Ok(_) => info!(method, id, ms, "ok"),
        Err(s) => warn!(method, id, code = ?s.code(), error = s.message(), ms, "failed"),
    }
    result
}

/// Runs a handler returning `CsiResult`, logs it with [`logged`], and converts its error: the body
/// of every gRPC method of the driver.
#[macro_export]
macro_rules! serve {
    ($method:literal, $id:expr, $call:expr) => {{
        let id: String = $id;
        $crate::rpc::logged($method, &id, async {
            $call.await.map(::tonic::Response::new).map_err(::tonic::Status::from)
        })
        .await
    }};
}
