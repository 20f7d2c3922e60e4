//! Request handling: the per-connection session state and the translation of each request into store
//! calls. The connection loop owns I/O; this module owns meaning.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferrovol_proto::limits::*;
use ferrovol_proto::opcode::{
    FEATURES_ALL, FEATURE_FS_NOTIFY, FEATURE_FS_OPEN_INLINE, FEATURE_SNAPSHOT_KIND,
};
use ferrovol_proto::*;
use tracing::{debug, warn};

use crate::error::{StoreError, StoreResult};
use crate::listener::Context;
use crate::store::Volume;

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reply(r) => f.debug_tuple("Reply").field(r).finish(),
            Outcome::Later(_) => f.write_str("Later(..)"),
            Outcome::Blocking(_) => f.write_str("Blocking(..)"),
            Outcome::ReplyAndClose(r) => f.debug_tuple("ReplyAndClose").field(r).finish(),
        }
    }
}

/// Volumes one connection may have open at once.
pub const HANDLES_PER_CONNECTION_MAX: usize = 1024;

/// What to do with a request's answer.
pub enum Outcome {
    Reply(Response),
    /// Answered later by a background task (FLUSH, FUA writes wait for fdatasync off the read loop).
    Later(Pin<Box<dyn Future<Output = Response> + Send>>),
    /// Answer, then close the connection (failed handshake).
    ReplyAndClose(Response),
    /// Answered by a file worker thread, which runs this and writes the reply itself (a file
    /// operation blocks; handing its result back to the connection's task would cost one more
    /// thread wakeup per request, on this VM as much as the whole round trip).
    Blocking(Box<dyn FnOnce() -> Response + Send>),
}

struct OpenVolume {
    vol: Arc<Volume>,
    read_only: bool,
    /// Read-write handles: the writer attachment generation they were opened under (every write is
    /// checked against the volume's current one).
    generation: u64,
    /// fs volumes, for a client that takes FS_NOTIFY: what it caches there.
    watcher: Option<Arc<crate::notify::Watcher>>,
    /// The volume's series (requests, latency, bytes).
    meter: Arc<crate::metrics::VolumeMeter>,
}

/// A connection's session: who the peer is (after HELLO) and which volumes it has open.
#[derive(Default)]
pub struct Session {
    node: Option<NodeId>,
    /// The node's name, shared with the file operations ("" before HELLO): its share of the fd
    /// budget.
    fs_node: Arc<str>,
    /// Authenticated with the admin credential: may act on other nodes' attachments and force
    /// deletes.
    admin: bool,
    /// The client's session id from HELLO (shared by its connections and reconnects).
    client_session: u64,
    /// Feature bits agreed in HELLO.
    features: u64,
    /// FS_NOTIFY frames on their way to this client (made at its first fs OPEN), and the
    /// receiving end until the connection takes it (`take_notices`).
    outbox: Option<Arc<crate::notify::Outbox>>,
    notices: Option<crate::notify::Queue>,
    /// This connection's slot of the client session, and the epoch it writes under (a reconnect of
    /// the slot moves the epoch on and retires this connection).
    slot: Option<(Arc<crate::listener::SlotFence>, u64)>,
    handles: HashMap<u32, OpenVolume>,
    next_handle: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("node", &self.node).field("handles", &self.handles.len()).finish()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for (_, h) in self.handles.drain() {
            release(&h, self.client_session);
        }
    }
}

/// Undoes what OPEN counted for a handle.
fn release(h: &OpenVolume, client_session: u64) {
    if let Some(m) = h.vol.mounted() {
        if let Some(w) = &h.watcher {
            m.watchers.remove(w);
        }
        m.locks.session_down(client_session, &m.files);
    }
    if !h.read_only && !h.vol.is_fs() {
        h.vol.close_writer(h.generation, client_session);
    }
    h.vol.opens.fetch_sub(1, Ordering::AcqRel);
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response timing.
fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

/// Who the HELLO proves to be: `(admin, new credential)`, or why it is refused.
///
/// - Open mode (no token configured): anyone, as any node, as admin. Identity is only claimed.
/// - The admin token: admin, as the node it names.
/// - An enrolled node: only with its own credential (compared by SHA-256, in constant time).
/// - A node not enrolled yet, with the join token: enrolled now; the reply carries its credential.
///
/// Enrollment writes `nodes.json` (an fsync) on this connection's thread: it happens once per node.
fn authenticate(ctx: &Context, hello: &Hello) -> Result<(bool, Option<String>), String> {
    let auth = &ctx.auth;
    if auth.is_open() {
        return Ok((true, None));
    }
    if auth.admin_token.as_deref().is_some_and(|t| token_eq(t, &hello.token)) {
        return Ok((true, None));
    }
    let node = &hello.node_id;
    if let Some(hash) = ctx.store.node_credential(node) {
        if token_eq(&hash, &sha256_hex(&hello.token)) {
            return Ok((false, None));
        }
        return Err(format!(
            "wrong credential for node {node}: an enrolled node must present its own credential (if it \
             lost it, an admin can `ferrovol node reset {node}` so that it enrolls again)"
        ));
    }
    match &auth.join_token {
        Some(join) if token_eq(join, &hello.token) => {
            let credential = new_credential();
            match ctx.store.node_enroll(node, sha256_hex(&credential)) {
                Ok(()) => Ok((false, Some(credential))),
                Err(StoreError::AlreadyExists(_)) => {
                    Err(format!("node {node} was enrolled meanwhile; retry with its credential"))
                }
                Err(e) => Err(format!("cannot enroll node {node}: {e}")),
            }
        }
        _ => Err(format!(
            "node {node} is not enrolled, and the token is neither the join token nor the admin token"
        )),
    }
}

/// A node credential: 256 random bits, hex.
fn new_credential() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn err(id: RequestId, op: Opcode, e: &StoreError) -> Response {
    Response { request_id: id, opcode: op as u8, result: Err(e.to_reply()) }
}

fn done(id: RequestId, op: Opcode, r: StoreResult<Reply>) -> Response {
    match r {
        Ok(reply) => Response::ok(id, op, reply),
        Err(e) => err(id, op, &e),
    }
}

/// Runs blocking store work (metadata fsyncs, fdatasync) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(format!("storage task failed: {e}")))))
}

/// Makes `vol` durable, then answers `reply`: inline while its fdatasyncs are fast (tmpfs, an idle
/// fast disk), else on the blocking pool.
fn durable(id: RequestId, op: Opcode, vol: Arc<Volume>, reply: Reply) -> Outcome {
    if vol.flush_is_fast() {
        return Outcome::Reply(done(id, op, vol.flush().map(|()| reply)));
    }
    Outcome::Later(Box::pin(async move {
        let r = blocking(move || vol.flush()).await;
        done(id, op, r.map(|()| reply))
    }))
}

/// A control operation on the store: run on the blocking pool (it may fsync metadata) and answered
/// when done, while the connection goes on reading and serving the requests behind it.
fn store_op<T: Send + 'static>(
    ctx: &Context,
    id: RequestId,
    op: Opcode,
    f: impl FnOnce(&crate::store::Store) -> StoreResult<T> + Send + 'static,
    reply: impl FnOnce(T) -> Reply + Send + 'static,
) -> Outcome {
    let store = ctx.store.clone();
    Outcome::Later(Box::pin(async move {
        let r = blocking(move || f(&store)).await;
        done(id, op, r.map(reply))
    }))
}

/// A snapshot as a client is told it: without FEATURE_SNAPSHOT_KIND, as of a block volume (the
/// kinds trailer would break its parser; a restore of an fs one as block is refused, by name).
fn snapshot_for(kinds: bool, mut v: SnapshotInfo) -> SnapshotInfo {
    if !kinds {
        v.kind = ferrovol_proto::codec::VOLUME_KIND_BLOCK;
    }
    v
}

impl Session {
    /// The series a request on an open volume counts in, and the payload bytes it writes; `None`
    /// for control requests and unknown handles.
    pub fn meter(&self, req: &Request) -> Option<(Arc<crate::metrics::VolumeMeter>, u64)> {
        if !crate::metrics::enabled() {
            return None;
        }
        let (handle, written) = match req {
            Request::Read { handle, .. } | Request::Trim { handle, .. } | Request::Flush { handle } => {
                (handle, 0)
            }
            Request::WriteZeroes { handle, .. } => (handle, 0),
            Request::Write { handle, data, .. } => (handle, data.len() as u64),
            Request::Fs { handle, op: ferrovol_proto::fs::FsOp::Write { data, .. }, .. } => {
                (handle, data.len() as u64)
            }
            Request::Fs { handle, .. } => (handle, 0),
            _ => return None,
        };
        Some((self.handles.get(&handle.0)?.meter.clone(), written))
    }

    pub fn is_ready(&self) -> bool {
        self.node.is_some()
    }

    /// The FS_NOTIFY queue made since the last call, for the connection to deliver from.
    pub fn take_notices(&mut self) -> Option<(Arc<crate::notify::Outbox>, crate::notify::Queue)> {
        let rx = self.notices.take()?;
        Some((self.outbox.clone()?, rx))
    }

    /// A handle of a block volume (block I/O on an fs volume would write under its filesystem).
    fn block_of(&self, h: VolumeHandle) -> StoreResult<&OpenVolume> {
        let v = self.handle_of(h)?;
        if v.vol.is_fs() {
            return Err(StoreError::InvalidArgument(format!(
                "volume {} is an fs volume: it is read and written through file operations",
                v.vol.name()
            )));
        }
        Ok(v)
    }

    fn handle_of(&self, h: VolumeHandle) -> StoreResult<&OpenVolume> {
        self.handles.get(&h.0).ok_or(StoreError::BadHandle(h.0))
    }

    pub fn handle(&mut self, ctx: &Context, id: RequestId, req: Request) -> Outcome {
        let op = req.opcode();
        if self.node.is_none() {
            let Request::Hello(hello) = req else {
                return Outcome::ReplyAndClose(Response::error(
                    id,
                    op as u8,
                    Status::NotReady,
                    "the first request on a connection must be HELLO",
                ));
            };
            return self.hello(ctx, id, hello);
        }
        match req {
            Request::Hello(_) => {
                Outcome::Reply(Response::error(id, op as u8, Status::NotReady, "HELLO was already done"))
            }
            Request::Ping => Outcome::Reply(Response::ok(id, op, Reply::Done)),
            Request::VolumeCreate { name, kind, size, labels, source } => store_op(
                ctx,
                id,
                op,
                move |s| s.create(&name, kind, size, &labels, source.as_ref()),
                Reply::Volume,
            ),
            Request::SnapshotCreate { name, source, labels } => {
                let kinds = self.features & FEATURE_SNAPSHOT_KIND != 0;
                store_op(
                    ctx,
                    id,
                    op,
                    move |s| s.snapshot_create(&name, &source, &labels),
                    move |v| Reply::Snapshot(snapshot_for(kinds, v)),
                )
            }
            Request::SnapshotDelete { name } => {
                store_op(ctx, id, op, move |s| s.snapshot_delete(&name), |()| Reply::Done)
            }
            Request::SnapshotStat { name } => {
                let kinds = self.features & FEATURE_SNAPSHOT_KIND != 0;
                store_op(
                    ctx,
                    id,
                    op,
                    move |s| s.snapshot_stat(&name),
                    move |v| Reply::Snapshot(snapshot_for(kinds, v)),
                )
            }
            Request::SnapshotList { source, start_after, max_entries } => {
                let kinds = self.features & FEATURE_SNAPSHOT_KIND != 0;
                store_op(
                    ctx,
                    id,
                    op,
                    move |s| Ok(s.snapshot_list(source.as_ref(), start_after.as_ref(), max_entries)),
                    move |(entries, more): (Vec<SnapshotInfo>, bool)| Reply::SnapshotList {
                        entries: entries.into_iter().map(|v| snapshot_for(kinds, v)).collect(),
                        more,
                    },
                )
            }
            Request::VolumeDelete { name, force } => {
                if let Err(e) = self.admin_for(force, || format!("forcing the delete of volume {name}")) {
                    return Outcome::Reply(err(id, op, &e));
                }
                store_op(ctx, id, op, move |s| s.delete(&name, force), |()| Reply::Done)
            }
            Request::VolumeList { start_after, max_entries } => store_op(
                ctx,
                id,
                op,
                move |s| Ok(s.list(start_after.as_ref(), max_entries)),
                |(entries, more)| Reply::List { entries, more },
            ),
            Request::VolumeStat { name } => {
                store_op(ctx, id, op, move |s| s.get(&name).map(|v| v.info()), Reply::Volume)
            }
            Request::VolumeResize { name, size } => {
                store_op(ctx, id, op, move |s| s.resize(&name, size), Reply::Volume)
            }
            Request::AttachSet { name, node, force } => {
                if let Err(e) = self.may_act_for(&node) {
                    return Outcome::Reply(err(id, op, &e));
                }
                let admin = self.admin;
                store_op(
                    ctx,
                    id,
                    op,
                    move |s| s.attach_set(&name, &node, force, admin),
                    |generation| Reply::Attached { generation },
                )
            }
            Request::AttachClear { name, node, generation } => {
                if let Err(e) = self.may_act_for(&node) {
                    return Outcome::Reply(err(id, op, &e));
                }
                store_op(ctx, id, op, move |s| s.attach_clear(&name, &node, generation), |()| Reply::Done)
            }
            Request::NodeRegister { node } => {
                if let Err(e) = self.may_act_for(&node) {
                    return Outcome::Reply(err(id, op, &e));
                }
                store_op(
                    ctx,
                    id,
                    op,
                    move |s| s.node_register(&node),
                    |registered_unix_ms| Reply::Node { registered_unix_ms },
                )
            }
            Request::NodeReset { node } => {
                if let Err(e) = self.admin_for(true, || format!("resetting the credential of node {node}")) {
                    return Outcome::Reply(err(id, op, &e));
                }
                store_op(ctx, id, op, move |s| s.node_reset(&node), |()| Reply::Done)
            }
            Request::NodeStat { node } => store_op(
                ctx,
                id,
                op,
                move |s| s.node_stat(&node),
                |registered_unix_ms| Reply::Node { registered_unix_ms },
            ),
            Request::StoreStat => store_op(ctx, id, op, move |s| s.stat(), Reply::StoreStat),
            Request::Open { name, read_only, generation } => {
                Outcome::Reply(done(id, op, self.open(&ctx.store, &name, read_only, generation)))
            }
            Request::Close { handle } => {
                let r = match self.handles.remove(&handle.0) {
                    Some(h) => {
                        // A watcher other handles of the volume share stays, naming one of them.
                        let sharing = h.watcher.as_ref().and_then(|w| {
                            self.handles
                                .iter()
                                .find(|(_, o)| o.watcher.as_ref().is_some_and(|x| Arc::ptr_eq(x, w)))
                                .map(|(k, _)| (w.clone(), *k))
                        });
                        let h = match sharing {
                            Some((w, other)) => {
                                w.set_handle(VolumeHandle(other));
                                OpenVolume { watcher: None, ..h }
                            }
                            None => h,
                        };
                        release(&h, self.client_session);
                        Ok(Reply::Done)
                    }
                    None => Err(StoreError::BadHandle(handle.0)),
                };
                Outcome::Reply(done(id, op, r))
            }
            Request::Read { handle, offset, len } => {
                let r = self.block_of(handle).and_then(|h| h.vol.read(offset, len)).map(Reply::Data);
                Outcome::Reply(self.logged(done(id, op, r), handle))
            }
            Request::Write { handle, offset, data, fua } => {
                let r = self.writable(handle, |vol| vol.write(offset, &data));
                self.maybe_durable(id, op, handle, r, fua)
            }
            Request::WriteZeroes { handle, offset, len, fua } => {
                let r = self.writable(handle, |vol| vol.write_zeroes(offset, len));
                self.maybe_durable(id, op, handle, r, fua)
            }
            Request::Trim { handle, offset, len } => {
                let r = self.writable(handle, |vol| vol.trim(offset, len)).map(|_| Reply::Done);
                Outcome::Reply(self.logged(done(id, op, r), handle))
            }
            Request::Flush { handle } => match self.block_of(handle) {
                Ok(h) => durable(id, op, h.vol.clone(), Reply::Done),
                Err(e) => Outcome::Reply(err(id, op, &e)),
            },
            Request::Fs { handle, node, creds, op: fsop } => {
                let mount = match self.handle_of(handle).and_then(|h| Ok((h.vol.fs_mount()?, h.read_only))) {
                    Ok(m) => m,
                    Err(e) => return Outcome::Reply(err(id, op, &e)),
                };
                let (mount, read_only) = mount;
                let cx = crate::files::Context {
                    read_only,
                    session: self.client_session,
                    node: self.fs_node.clone(),
                    watcher: self.handles.get(&handle.0).and_then(|h| h.watcher.clone()),
                    inline: self.features & FEATURE_FS_OPEN_INLINE != 0,
                };
                let wait = crate::files::may_change(&fsop) && mount.is_frozen();
                let mut thawed = mount.frozen.subscribe();
                let job: Box<dyn FnOnce() -> Response + Send> = Box::new(move || {
                    let result = crate::files::execute(&mount, &cx, node, &creds, fsop);
                    Response { request_id: id, opcode: op as u8, result: result.map(Reply::Fs) }
                });
                if !wait {
                    return Outcome::Blocking(job);
                }
                // Frozen for a point-in-time copy: the change waits for the thaw here, not on a
                // file worker, which every fs volume shares (reads go on meanwhile).
                Outcome::Later(Box::pin(async move {
                    let _ = thawed.wait_for(|frozen| !*frozen).await;
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if !crate::files::submit(move || {
                        let _ = tx.send(job());
                    }) {
                        return Response::error(id, op as u8, Status::Internal, "no file worker thread");
                    }
                    rx.await.unwrap_or_else(|_| {
                        Response::error(id, op as u8, Status::Internal, "the file worker dropped the request")
                    })
                }))
            }
        }
    }

    fn hello(&mut self, ctx: &Context, id: RequestId, hello: Hello) -> Outcome {
        if hello.version_min > PROTOCOL_VERSION || hello.version_max < PROTOCOL_VERSION_MIN {
            crate::metrics::metrics().refused("unsupported_version");
            return Outcome::ReplyAndClose(Response::error(
                id,
                Opcode::Hello as u8,
                Status::UnsupportedVersion,
                format!(
                    "client speaks versions {}..={}, server {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}",
                    hello.version_min, hello.version_max
                ),
            ));
        }
        let (admin, credential) = match authenticate(ctx, &hello) {
            Ok(who) => who,
            Err(message) => {
                crate::metrics::metrics().refused("auth_failed");
                crate::listener::refusal(|| warn!(node = %hello.node_id, %message, "authentication failed"));
                return Outcome::ReplyAndClose(Response::error(
                    id,
                    Opcode::Hello as u8,
                    Status::AuthFailed,
                    message,
                ));
            }
        };
        debug!(node = %hello.node_id, admin, "handshake done");
        self.fs_node = Arc::from(hello.node_id.as_str());
        self.node = Some(hello.node_id);
        self.client_session = hello.session;
        self.slot = Some(ctx.slots.claim(hello.session, hello.slot));
        self.admin = admin;
        self.features = hello.features & FEATURES_ALL;
        let mut session_flags = if admin { ferrovol_proto::opcode::SESSION_ADMIN } else { 0 };
        if credential.is_some() {
            session_flags |= ferrovol_proto::opcode::SESSION_ENROLLED;
        }
        Outcome::Reply(Response::ok(
            id,
            Opcode::Hello,
            Reply::Hello(HelloReply {
                version: PROTOCOL_VERSION,
                session_flags,
                credential: credential.unwrap_or_default(),
                features: self.features,
                in_flight_requests_max: IN_FLIGHT_REQUESTS_MAX,
                in_flight_bytes_max: IN_FLIGHT_BYTES_MAX,
                payload_len_max: PAYLOAD_LEN_MAX,
                server_id: ctx.store.server_id().to_owned(),
            }),
        ))
    }

    /// Only the node itself, or an admin, may set or clear its attachments and register it.
    fn may_act_for(&self, node: &NodeId) -> StoreResult<()> {
        if self.admin || self.node.as_ref() == Some(node) {
            return Ok(());
        }
        Err(StoreError::Forbidden(format!(
            "this session is node {:?}: it may not act for node \"{node}\" (only the admin credential may)",
            self.node.as_ref().map(NodeId::as_str).unwrap_or("")
        )))
    }

    /// `what` needs the admin credential when `needed`.
    fn admin_for(&self, needed: bool, what: impl FnOnce() -> String) -> StoreResult<()> {
        if needed && !self.admin {
            return Err(StoreError::Forbidden(format!("{} needs the admin credential", what())));
        }
        Ok(())
    }

    /// OPEN: read-only for anyone; read-write only under the session node's current writer
    /// attachment `generation`, for one client session at a time.
    fn open(
        &mut self,
        store: &crate::store::Store,
        name: &VolumeName,
        read_only: bool,
        generation: u64,
    ) -> StoreResult<Reply> {
        if self.handles.len() >= HANDLES_PER_CONNECTION_MAX {
            return Err(StoreError::InvalidArgument(format!(
                "{HANDLES_PER_CONNECTION_MAX} volumes are already open on this connection"
            )));
        }
        // Handles exist only after HELLO, so the node is known here.
        let node = self.node.clone().ok_or(StoreError::InvalidArgument("handshake required".into()))?;
        let vol = store.open_volume(name)?;
        if vol.is_fs() {
            // Many writers: the server arbitrates (no writer attachment). Mounted at the first open.
            if generation != 0 {
                vol.opens.fetch_sub(1, Ordering::AcqRel);
                return Err(StoreError::InvalidArgument(format!(
                    "volume {name} is an fs volume: it has no writer attachment (open it with generation 0)"
                )));
            }
            match vol.fs_mount() {
                Ok(m) => m.locks.session_up(self.client_session),
                Err(e) => {
                    vol.opens.fetch_sub(1, Ordering::AcqRel);
                    return Err(e);
                }
            }
        } else if !read_only {
            if let Err(e) = vol.open_writer(&node, generation, self.client_session) {
                vol.opens.fetch_sub(1, Ordering::AcqRel);
                return Err(e);
            }
        }
        // Handle numbers are not reused while open, and 0 is never a valid handle (after 2^32
        // opens on one connection the counter wraps and skips the numbers still in use).
        self.next_handle = self.next_handle.wrapping_add(1).max(1);
        while self.handles.contains_key(&self.next_handle) {
            self.next_handle = self.next_handle.wrapping_add(1).max(1);
        }
        let handle = VolumeHandle(self.next_handle);
        let size = vol.size();
        debug!(volume = %name, %handle, read_only, generation, "volume opened");
        // One watcher per connection and volume, however often it is opened here.
        let shared = self
            .handles
            .values()
            .find(|o| o.watcher.is_some() && Arc::ptr_eq(&o.vol, &vol))
            .and_then(|o| o.watcher.clone());
        let watcher = match vol.mounted() {
            Some(_) if shared.is_some() => shared,
            Some(m) if self.features & FEATURE_FS_NOTIFY != 0 => {
                let outbox = match &self.outbox {
                    Some(o) => o.clone(),
                    None => {
                        let (o, rx) = crate::notify::Outbox::new();
                        self.notices = Some(rx);
                        self.outbox = Some(o.clone());
                        o
                    }
                };
                let w = crate::notify::Watcher::new(self.client_session, handle, outbox);
                m.watchers.add(w.clone());
                Some(w)
            }
            _ => None,
        };
        let meter = crate::metrics::metrics().volume(vol.name().as_str());
        self.handles.insert(handle.0, OpenVolume { vol, read_only, generation, watcher, meter });
        Ok(Reply::Opened { handle, size, read_only })
    }

    /// Runs `write` on the volume behind `handle` if this session may write to it: opened
    /// read-write, under the volume's current writer attachment generation (fencing, checked for
    /// every request, held until the write is done).
    fn writable<T>(
        &self,
        handle: VolumeHandle,
        write: impl FnOnce(&Volume) -> StoreResult<T>,
    ) -> StoreResult<Arc<Volume>> {
        let h = self.block_of(handle)?;
        if h.read_only {
            return Err(StoreError::ReadOnly);
        }
        let write = || h.vol.fenced(h.generation, || write(&h.vol));
        match &self.slot {
            Some((fence, epoch)) => fence.current(*epoch, write).unwrap_or(Err(StoreError::Replaced))?,
            None => write()?,
        };
        Ok(h.vol.clone())
    }

    fn maybe_durable(
        &self,
        id: RequestId,
        op: Opcode,
        handle: VolumeHandle,
        r: StoreResult<Arc<Volume>>,
        fua: bool,
    ) -> Outcome {
        match r {
            Ok(vol) if fua => durable(id, op, vol, Reply::Done),
            Ok(_) => Outcome::Reply(Response::ok(id, op, Reply::Done)),
            Err(e) => Outcome::Reply(self.logged(err(id, op, &e), handle)),
        }
    }

    /// Logs a failed data request with the volume it concerns.
    fn logged(&self, resp: Response, handle: VolumeHandle) -> Response {
        if let Err(e) = &resp.result {
            let volume = self.handles.get(&handle.0).map(|h| h.vol.name().to_string()).unwrap_or_default();
            match e.status {
                Status::Io | Status::NoSpace => {
                    warn!(%volume, request = %resp.request_id, error = %e, "I/O failed")
                }
                _ => debug!(%volume, request = %resp.request_id, error = %e, "request refused"),
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::token_eq;

    #[test]
    fn token_comparison() {
        assert!(token_eq("secret", "secret"));
        assert!(!token_eq("secret", "secreT"));
        assert!(!token_eq("secret", "secret2"));
        assert!(!token_eq("secret", ""));
        assert!(token_eq("", ""));
    }
}
