//! Sessions: connections to one server, and the control operations.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrovol_proto::limits::LIST_ENTRIES_MAX;
use ferrovol_proto::{
    HelloReply, Labels, NodeId, Opcode, Reply, Request, SnapshotInfo, Status, VolumeInfo, VolumeName,
    VolumeSource,
};

use crate::conn::{self, ConnHandle, Op};
use crate::credential::Credentials;
use crate::error::{ClientError, Result};
use crate::volume::Volume;

/// How to connect.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Who we are: the writer attachment (fencing) is checked against this.
    pub node_id: NodeId,
    /// What to present when this node has no credential yet: the join token (the server then
    /// enrolls the node and issues its credential) or the admin token. Empty: none.
    pub token: String,
    /// Where this node's credential is kept once issued, and read from on every connect (see
    /// [`crate::default_credential_file`]). `None`: it is kept in memory only, for this session.
    pub credential_file: Option<std::path::PathBuf>,
    /// Parallel TCP connections (requests are spread round-robin).
    pub connections: usize,
    /// Limit for one connect + handshake attempt.
    pub connect_timeout: Duration,
    /// The longest any request waits for its answer, reconnects included; then the caller gets an error.
    pub io_timeout: Duration,
    /// How long the reader polls the socket before its thread sleeps, while replies are awaited and
    /// between calls that follow each other closely (`ferrovol_proto::io::Spin`): trades a little CPU
    /// for latency at low queue depth. Zero disables.
    pub poll: Duration,
    /// TLS: the CA to verify the server with (and an optional client certificate), see
    /// [`ClientTls`]. `None`: plaintext.
    pub tls: Option<ClientTls>,
    /// The client session id to speak as (HELLO `session`); `None`: a fresh random one. A process
    /// that takes over from a dead one of the same mount passes the dead one's id: the server then
    /// takes its connections as reconnects of the old ones, retiring each old connection of the same
    /// slot and waiting for its writes in flight, so none of them can land later.
    pub session_id: Option<u64>,
}

/// A client's TLS settings.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<ferrovol_proto::tls::ClientConfig>,
    /// The name the server's certificate must carry (the host of the server address).
    pub server_name: ferrovol_proto::tls::TlsServerName<'static>,
}

impl ClientTls {
    /// From PEM files: the CA, and optionally a client certificate and key; for server `addr`.
    pub fn from_files(
        addr: &str,
        ca: &std::path::Path,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> std::result::Result<Self, ferrovol_proto::tls::TlsError> {
        Ok(Self {
            config: ferrovol_proto::tls::client_config(ca, client)?,
            server_name: ferrovol_proto::tls::server_name(addr)?,
        })
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("ConnectOptions")
            .field("node_id", &self.node_id)
            .field("token", &if self.token.is_empty() { "" } else { "<set>" })
            .field("credential_file", &self.credential_file)
            .field("connections", &self.connections)
            .field("io_timeout", &self.io_timeout)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The node id when none is configured: `FERROVOL_NODE_ID`, else the host name.
pub fn default_node_id() -> NodeId {
    let from_env = std::env::var("FERROVOL_NODE_ID").ok();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    [from_env, host]
        .into_iter()
        .flatten()
        .find_map(|s| NodeId::try_from(s.trim()).ok())
        .unwrap_or_else(|| NodeId::try_from("ferrovol-client").unwrap_or_else(|_| unreachable!()))
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            node_id: default_node_id(),
            token: std::env::var("FERROVOL_TOKEN").unwrap_or_default(),
            credential_file: std::env::var_os("FERROVOL_CREDENTIAL_FILE").map(Into::into),
            connections: 1,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            poll: Duration::from_micros(100),
            tls: None,
            session_id: None,
        }
    }
}

/// A client session with one server. Cheap to clone; all clones share the connections.
#[derive(Debug, Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

#[derive(Debug)]
struct SessionInner {
    addr: SocketAddr,
    node_id: NodeId,
    conns: Vec<ConnHandle>,
    hello: HelloReply,
    rr: AtomicUsize,
}

/// Resolves `host:port` (the first address wins).
pub async fn resolve(addr: &str) -> Result<SocketAddr> {
    // "host" or "[v6]" alone: lookup_host would say "invalid socket address".
    let has_port = match addr.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
        }
        None => false,
    };
    let port = crate::DEFAULT_SERVER.rsplit(':').next().unwrap_or("7700");
    if !addr.starts_with('[') && addr.matches(':').count() >= 2 {
        // An IPv6 address without brackets: its last group would be taken for a port.
        let host = addr.trim_end_matches(':');
        return Err(ClientError::Connect {
            addr: addr.to_owned(),
            reason: format!("an IPv6 address needs brackets and a port: write [{host}]:{port}"),
        });
    }
    if !has_port && !addr.contains("]:") {
        let host = addr.trim_end_matches(':');
        return Err(ClientError::Connect {
            addr: addr.to_owned(),
            reason: format!("no port (or not a number) in the address: write {host}:{port}"),
        });
    }
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(|e| ClientError::Connect {
        addr: addr.to_owned(),
        reason: format!("cannot resolve: {e}"),
    })?;
    addrs.next().ok_or_else(|| ClientError::Connect { addr: addr.to_owned(), reason: "no address".into() })
}

/// What a session's connections have done, for `ferrovol status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionStats {
    pub connections: usize,
    /// Requests sent (or waiting to be) and not yet answered.
    pub in_flight: usize,
    /// Reconnects that succeeded since the session started.
    pub reconnects: u64,
}

impl Session {
    /// Counters of this session's connections (cheap: a lock and an atomic per connection).
    pub fn stats(&self) -> SessionStats {
        let conns = &self.inner.conns;
        SessionStats {
            connections: conns.len(),
            in_flight: conns.iter().map(ConnHandle::in_flight).sum(),
            reconnects: conns.iter().map(ConnHandle::reconnects).sum(),
        }
    }

    /// Connects (every connection, with handshake) and fails fast with a clear error when the server is
    /// unreachable or refuses us. Reconnects later on are transparent.
    pub async fn connect(addr: &str, opts: ConnectOptions) -> Result<Session> {
        let sock = resolve(addr).await?;
        let n = opts.connections.clamp(1, 64);
        // One id for all of this session's connections and reconnects: the server lets one client
        // session at a time write a volume, and a reconnect is still the same writer.
        let client_session = opts.session_id.unwrap_or_else(|| rand::random::<u64>() | 1);
        let creds = Arc::new(Credentials::new(opts.credential_file.clone()));
        let mut conns = Vec::with_capacity(n);
        let mut hello = None;
        for i in 0..n {
            let slot = conn::SessionSlot { id: client_session, slot: u16::try_from(i).unwrap_or(u16::MAX) };
            let est = conn::establish(sock, &opts, slot, &creds).await?;
            hello.get_or_insert_with(|| est.hello.clone());
            conns.push(conn::spawn(sock, opts.clone(), slot, creds.clone(), est));
        }
        let hello = hello.ok_or(ClientError::Closed)?;
        let node_id = opts.node_id;
        Ok(Session {
            inner: Arc::new(SessionInner { addr: sock, node_id, conns, hello, rr: AtomicUsize::new(0) }),
        })
    }

    pub fn server_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The node this session acts as.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.node_id
    }

    /// Whether the server took this session as admin (the admin token, or a server without
    /// credentials, where everyone is).
    pub fn is_admin(&self) -> bool {
        self.inner.hello.session_flags & ferrovol_proto::opcode::SESSION_ADMIN != 0
    }

    /// Admin: forgets `node`'s credential, so that it can enroll again with the join token.
    pub async fn reset_node(&self, node: &NodeId) -> Result<()> {
        self.control(Request::NodeReset { node: node.clone() }).await.map(|_| ())
    }

    /// What the server said in the handshake (limits, features, server id).
    pub fn server_info(&self) -> &HelloReply {
        &self.inner.hello
    }

    fn conn(&self) -> &ConnHandle {
        let i = self.inner.rr.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        &self.inner.conns[i]
    }

    async fn control(&self, req: Request) -> Result<Reply> {
        self.conn().call(Op::Control(req)).await
    }

    pub async fn create_volume(&self, name: &VolumeName, size: u64) -> Result<VolumeInfo> {
        self.create_volume_labeled(name, size, Labels::new()).await
    }

    /// Creates a volume that keeps `labels` (returned in its [`VolumeInfo`]).
    pub async fn create_volume_labeled(
        &self,
        name: &VolumeName,
        size: u64,
        labels: Labels,
    ) -> Result<VolumeInfo> {
        self.create_volume_from(name, size, labels, None).await
    }

    /// Creates a volume, from a snapshot or (a clone) a volume when `source` is given; `size` 0 is
    /// then the source's size. A copy (where the server cannot reflink) runs within the call, so a
    /// large one may outlast the client's I/O timeout: the server still finishes it, and the volume
    /// then exists (a retry gets `ALREADY_EXISTS`, or `BUSY` while it is being made).
    pub async fn create_volume_from(
        &self,
        name: &VolumeName,
        size: u64,
        labels: Labels,
        source: Option<VolumeSource>,
    ) -> Result<VolumeInfo> {
        self.create_volume_of_kind(name, ferrovol_proto::codec::VOLUME_KIND_BLOCK, size, labels, source).await
    }

    /// Creates a volume of `kind` (`VOLUME_KIND_BLOCK`, or `VOLUME_KIND_FS`: the server makes an
    /// ext4 on it and serves it file by file).
    pub async fn create_volume_of_kind(
        &self,
        name: &VolumeName,
        kind: u8,
        size: u64,
        labels: Labels,
        source: Option<VolumeSource>,
    ) -> Result<VolumeInfo> {
        match self.control(Request::VolumeCreate { name: name.clone(), kind, size, labels, source }).await? {
            Reply::Volume(v) => Ok(v),
            other => Err(unexpected(Opcode::VolumeCreate, other)),
        }
    }

    /// Cuts a point-in-time snapshot of volume `source`. Ready at once where the server reflinks,
    /// and for an fs volume (copied within the request); otherwise `ready` is false until its
    /// background copy is done (poll [`Session::stat_snapshot`]).
    pub async fn create_snapshot(
        &self,
        name: &VolumeName,
        source: &VolumeName,
        labels: Labels,
    ) -> Result<SnapshotInfo> {
        match self
            .control(Request::SnapshotCreate { name: name.clone(), source: source.clone(), labels })
            .await?
        {
            Reply::Snapshot(s) => Ok(s),
            other => Err(unexpected(Opcode::SnapshotCreate, other)),
        }
    }

    pub async fn delete_snapshot(&self, name: &VolumeName) -> Result<()> {
        self.control(Request::SnapshotDelete { name: name.clone() }).await.map(|_| ())
    }

    pub async fn stat_snapshot(&self, name: &VolumeName) -> Result<SnapshotInfo> {
        match self.control(Request::SnapshotStat { name: name.clone() }).await? {
            Reply::Snapshot(s) => Ok(s),
            other => Err(unexpected(Opcode::SnapshotStat, other)),
        }
    }

    /// One page of snapshots after `start_after` (only `source`'s when given); the bool says
    /// whether more follow.
    pub async fn list_snapshots_page(
        &self,
        source: Option<&VolumeName>,
        start_after: Option<&VolumeName>,
        max_entries: u32,
    ) -> Result<(Vec<SnapshotInfo>, bool)> {
        let req = Request::SnapshotList {
            source: source.cloned(),
            start_after: start_after.cloned(),
            max_entries: max_entries.clamp(1, LIST_ENTRIES_MAX),
        };
        match self.control(req).await? {
            Reply::SnapshotList { entries, more } => Ok((entries, more)),
            other => Err(unexpected(Opcode::SnapshotList, other)),
        }
    }

    /// Every snapshot (of `source`, when given), following pages.
    pub async fn list_snapshots(&self, source: Option<&VolumeName>) -> Result<Vec<SnapshotInfo>> {
        let mut all: Vec<SnapshotInfo> = vec![];
        loop {
            let (page, more) =
                self.list_snapshots_page(source, all.last().map(|v| &v.name), LIST_ENTRIES_MAX).await?;
            let empty = page.is_empty();
            all.extend(page);
            if !more || empty {
                return Ok(all);
            }
        }
    }

    /// Deletes a volume; refused while it is open or has a writer attachment.
    pub async fn delete_volume(&self, name: &VolumeName) -> Result<()> {
        self.control(Request::VolumeDelete { name: name.clone(), force: false }).await.map(|_| ())
    }

    /// Deletes a volume although a writer attachment is recorded (its holder is known to be gone).
    /// Needs the admin credential; still refused while the volume is open.
    pub async fn delete_volume_forced(&self, name: &VolumeName) -> Result<()> {
        self.control(Request::VolumeDelete { name: name.clone(), force: true }).await.map(|_| ())
    }

    pub async fn stat_volume(&self, name: &VolumeName) -> Result<VolumeInfo> {
        match self.control(Request::VolumeStat { name: name.clone() }).await? {
            Reply::Volume(v) => Ok(v),
            other => Err(unexpected(Opcode::VolumeStat, other)),
        }
    }

    pub async fn resize_volume(&self, name: &VolumeName, size: u64) -> Result<VolumeInfo> {
        match self.control(Request::VolumeResize { name: name.clone(), size }).await? {
            Reply::Volume(v) => Ok(v),
            other => Err(unexpected(Opcode::VolumeResize, other)),
        }
    }

    /// One page of volumes after `start_after`; the bool says whether more follow.
    pub async fn list_volumes_page(
        &self,
        start_after: Option<&VolumeName>,
        max_entries: u32,
    ) -> Result<(Vec<VolumeInfo>, bool)> {
        let req = Request::VolumeList {
            start_after: start_after.cloned(),
            max_entries: max_entries.clamp(1, LIST_ENTRIES_MAX),
        };
        match self.control(req).await? {
            Reply::List { entries, more } => Ok((entries, more)),
            other => Err(unexpected(Opcode::VolumeList, other)),
        }
    }

    /// Every volume, following pages.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut all: Vec<VolumeInfo> = vec![];
        loop {
            let (page, more) = self.list_volumes_page(all.last().map(|v| &v.name), LIST_ENTRIES_MAX).await?;
            let empty = page.is_empty();
            all.extend(page);
            if !more || empty {
                return Ok(all);
            }
        }
    }

    /// Records `node` as known to the server; returns its first registration time (unix ms).
    pub async fn register_node(&self, node: &NodeId) -> Result<u64> {
        match self.control(Request::NodeRegister { node: node.clone() }).await? {
            Reply::Node { registered_unix_ms } => Ok(registered_unix_ms),
            other => Err(unexpected(Opcode::NodeRegister, other)),
        }
    }

    /// When `node` was registered; `NOT_FOUND` when it never was.
    pub async fn stat_node(&self, node: &NodeId) -> Result<u64> {
        match self.control(Request::NodeStat { node: node.clone() }).await? {
            Reply::Node { registered_unix_ms } => Ok(registered_unix_ms),
            other => Err(unexpected(Opcode::NodeStat, other)),
        }
    }

    /// Capacity of the server's data dir.
    pub async fn store_stat(&self) -> Result<ferrovol_proto::StoreStat> {
        match self.control(Request::StoreStat).await? {
            Reply::StoreStat(st) => Ok(st),
            other => Err(unexpected(Opcode::StoreStat, other)),
        }
    }

    /// Sets the writer attachment to `node` and returns its generation. Only `node` itself or an
    /// admin may. `force` takes it over from another holder (fencing that holder's writes, even
    /// those in flight); without it, a volume held by another node is `ATTACHED_ELSEWHERE`.
    pub async fn attach_set(&self, name: &VolumeName, node: &NodeId, force: bool) -> Result<u64> {
        match self.control(Request::AttachSet { name: name.clone(), node: node.clone(), force }).await? {
            Reply::Attached { generation } => Ok(generation),
            other => Err(unexpected(Opcode::AttachSet, other)),
        }
    }

    /// Clears `node`'s writer attachment if it is still `generation` (0: whatever generation).
    pub async fn attach_clear(&self, name: &VolumeName, node: &NodeId, generation: u64) -> Result<()> {
        let req = Request::AttachClear { name: name.clone(), node: node.clone(), generation };
        self.control(req).await.map(|_| ())
    }

    /// Takes the writer attachment for this session's node (see [`Session::attach_set`]).
    pub async fn attach_writer(&self, name: &VolumeName, force: bool) -> Result<u64> {
        self.attach_set(name, &self.inner.node_id, force).await
    }

    /// Releases this node's writer attachment `generation` (a no-op once it was taken over, so an
    /// old holder never releases its successor).
    pub async fn release_writer(&self, name: &VolumeName, generation: u64) -> Result<()> {
        match self.attach_clear(name, &self.inner.node_id, generation).await {
            // Taken over since (by this node or another): nothing of ours to release.
            Err(e) if matches!(e.status(), Some(Status::Fenced | Status::AttachedElsewhere)) => Ok(()),
            r => r,
        }
    }

    /// Opens a volume for I/O, on every connection of the session. Read-write takes this node's
    /// writer attachment first (or finds it already held by this node) and keeps it after the
    /// volume is closed: release it with [`Session::release_writer`], or open with a known
    /// generation through [`Session::open_writer`].
    pub async fn open(&self, name: &VolumeName, read_only: bool) -> Result<Volume> {
        if read_only {
            return self.open_at(name, true, 0).await;
        }
        let generation = self.attach_writer(name, false).await?;
        self.open_at(name, false, generation).await
    }

    /// Opens a volume read-write under writer attachment `generation` (from [`Session::attach_set`]
    /// or a CSI publish context): `FENCED` when it is no longer current.
    pub async fn open_writer(&self, name: &VolumeName, generation: u64) -> Result<Volume> {
        self.open_at(name, false, generation).await
    }

    /// Opens an fs volume for file operations ([`Volume::fs`]), on every connection of the
    /// session. Many nodes may have one open read-write at once: the server arbitrates.
    pub async fn open_fs(&self, name: &VolumeName, read_only: bool) -> Result<Volume> {
        self.open_at(name, read_only, 0).await
    }

    async fn open_at(&self, name: &VolumeName, read_only: bool, generation: u64) -> Result<Volume> {
        let mut opened = Vec::with_capacity(self.inner.conns.len());
        let mut size = 0;
        for c in &self.inner.conns {
            let vol = c.new_local_vol();
            match c.call(Op::Open { vol, name: name.clone(), read_only, generation }).await {
                Ok(Reply::Opened { size: s, .. }) => {
                    size = s;
                    opened.push((c.clone(), vol));
                }
                Ok(other) => return Err(unexpected(Opcode::Open, other)),
                Err(e) => {
                    for (c, vol) in opened {
                        c.try_call(Op::Close { vol });
                    }
                    return Err(e);
                }
            }
        }
        Ok(Volume::new(name.clone(), size, read_only, generation, opened, self.inner.hello.payload_len_max))
    }
}

pub(crate) fn unexpected(op: Opcode, reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply to {op}: {reply:?}"))
}
