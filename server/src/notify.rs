//! Cache invalidations for fs volumes (FS_NOTIFY): which connections have seen which inodes, and
//! telling them what other clients changed there.
//!
//! - A connection that asked for `FEATURE_FS_NOTIFY` and OPENs an fs volume gets a [`Watcher`] on
//!   that volume's mount. Every node the connection names in a request, and every node a reply
//!   hands it (LOOKUP, CREATE, READDIR entries...), goes into the watcher's interest set: those
//!   are what its kernel may cache. The set is bounded (`INTEREST_MAX`); past it the watcher hears
//!   of every change on the volume (a kernel ignores notices about inodes it does not cache).
//! - A change that succeeds is published to the watchers of the other client sessions whose
//!   interest covers it (an entry notice by its directory, an inode notice by the inode). The
//!   client that made the change needs none: its kernel saw it happen.
//! - Notices go out on the connection from a task of their own, batched into frames of up to
//!   `FS_NOTICES_MAX`, without ever blocking the file operation that caused them: a connection
//!   whose queue is full loses them, and gets one `Notice::All` (drop everything) instead.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ferrovol_proto::fs::{Notice, Notices, FS_NOTICES_MAX};
use ferrovol_proto::VolumeHandle;
use tokio::sync::mpsc;

/// Nodes one watcher remembers before it hears of every change instead.
pub const INTEREST_MAX: usize = 1 << 17;
/// Notices queued for one connection before they are replaced by one `Notice::All`.
const QUEUE: usize = 4096;

/// The receiving end of a connection's notices.
pub type Queue = mpsc::Receiver<(VolumeHandle, Notice)>;

/// The notices on their way out on one connection, and the handles whose notices were lost.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<(VolumeHandle, Notice)>,
    lost: Mutex<Vec<VolumeHandle>>,
}

impl Outbox {
    /// A new outbox, and the receiving end for the connection's delivery task.
    pub fn new() -> (Arc<Self>, Queue) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Arc::new(Self { tx, lost: Mutex::new(Vec::new()) }), rx)
    }

    fn send(&self, handle: VolumeHandle, notice: Notice) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send((handle, notice)) {
            let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
            if !lost.contains(&handle) {
                lost.push(handle);
            }
        }
    }

    fn take_lost(&self) -> Vec<VolumeHandle> {
        std::mem::take(&mut *self.lost.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[derive(Debug, Default)]
struct Interest {
    nodes: HashSet<u64>,
    /// Past `INTEREST_MAX`: everything.
    all: bool,
}

/// One connection's view of one mounted fs volume.
#[derive(Debug)]
pub struct Watcher {
    /// The client session: its own changes are not sent back to it.
    session: u64,
    /// The handle its notices name: one of the connection's open handles of the volume (a
    /// connection that opens a volume several times has one watcher for all of them).
    handle: std::sync::atomic::AtomicU32,
    outbox: Arc<Outbox>,
    interest: Mutex<Interest>,
}

impl Watcher {
    pub fn new(session: u64, handle: VolumeHandle, outbox: Arc<Outbox>) -> Arc<Self> {
        Arc::new(Self {
            session,
            handle: std::sync::atomic::AtomicU32::new(handle.0),
            outbox,
            interest: Mutex::default(),
        })
    }

    /// Its notices name `handle` from now on (the one they named was closed).
    pub fn set_handle(&self, handle: VolumeHandle) {
        self.handle.store(handle.0, std::sync::atomic::Ordering::Release);
    }

    fn handle(&self) -> VolumeHandle {
        VolumeHandle(self.handle.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The client may cache these nodes now.
    pub fn saw(&self, nodes: impl IntoIterator<Item = u64>) {
        let mut i = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        if i.all {
            return;
        }
        for n in nodes {
            i.nodes.insert(n);
        }
        if i.nodes.len() > INTEREST_MAX {
            i.nodes = HashSet::new();
            i.all = true;
        }
    }

    fn cares(&self, node: u64) -> bool {
        let i = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        i.all || i.nodes.contains(&node)
    }
}

/// The watchers of one mounted fs volume.
#[derive(Debug, Default)]
pub struct Watchers {
    list: Mutex<Vec<Arc<Watcher>>>,
}

impl Watchers {
    pub fn add(&self, w: Arc<Watcher>) {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }

    pub fn remove(&self, w: &Arc<Watcher>) {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).retain(|x| !Arc::ptr_eq(x, w));
    }

    pub fn len(&self) -> usize {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A change by client session `from`: each notice goes to the other sessions' watchers whose
    /// interest holds its node (the directory, for entry notices).
    pub fn publish(&self, from: u64, notices: &[Notice]) {
        if notices.is_empty() {
            return;
        }
        let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        for w in list.iter().filter(|w| w.session != from) {
            for n in notices {
                let key = match n {
                    Notice::Inode { node, .. } => *node,
                    Notice::Entry { parent, .. } | Notice::Delete { parent, .. } => *parent,
                    Notice::All => {
                        w.outbox.send(w.handle(), Notice::All);
                        continue;
                    }
                };
                if w.cares(key) {
                    w.outbox.send(w.handle(), n.clone());
                }
            }
        }
    }
}

/// Groups queued notices into frames, per handle and in order: a lost handle gets `All` alone,
/// and repeats of one inode's notice (a stream of writes) merge into one covering range.
pub fn frames(queued: Vec<(VolumeHandle, Notice)>, lost: &[VolumeHandle]) -> Vec<Notices> {
    let mut out: Vec<Notices> = Vec::new();
    for h in lost {
        out.push(Notices { handle: *h, notices: vec![Notice::All] });
    }
    for (handle, n) in queued {
        if lost.contains(&handle) {
            continue;
        }
        let at = match out.iter().position(|f| f.handle == handle && f.notices.len() < FS_NOTICES_MAX) {
            Some(at) => at,
            None => {
                out.push(Notices { handle, notices: Vec::new() });
                out.len() - 1
            }
        };
        let notices = &mut out[at].notices;
        if let (
            Some(Notice::Inode { node: last, offset: o1, len: l1 }),
            Notice::Inode { node, offset, len },
        ) = (notices.last_mut(), &n)
        {
            if last == node {
                (*o1, *l1) = merge((*o1, *l1), (*offset, *len));
                continue;
            }
        }
        if notices.last() != Some(&n) {
            notices.push(n);
        }
    }
    out
}

/// Two inode notices as one: attributes only (offset < 0) unless either covers data; data ranges
/// cover both (len <= 0: to the end of the file).
fn merge(a: (i64, i64), b: (i64, i64)) -> (i64, i64) {
    match (a.0 < 0, b.0 < 0) {
        (true, true) => (-1, 0),
        (true, false) => b,
        (false, true) => a,
        (false, false) => {
            let start = a.0.min(b.0);
            if a.1 <= 0 || b.1 <= 0 {
                return (start, 0);
            }
            let end = a.0.saturating_add(a.1).max(b.0.saturating_add(b.1));
            (start, end - start)
        }
    }
}

/// Delivers a connection's notices until the connection (every sender) is gone or a write fails.
pub async fn deliver(
    mut rx: Queue,
    outbox: Arc<Outbox>,
    mut write: impl FnMut(Vec<Notices>) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
) {
    let mut queued = Vec::with_capacity(QUEUE);
    loop {
        if rx.recv_many(&mut queued, QUEUE).await == 0 {
            return;
        }
        let lost = outbox.take_lost();
        if !write(frames(std::mem::take(&mut queued), &lost)).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovol_proto::fs::FsName;

    fn name(s: &str) -> FsName {
        FsName::new(bytes::Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    #[test]
    fn notices_reach_the_other_sessions_that_saw_the_node() {
        let (outbox_b, mut rx_b) = Outbox::new();
        let (outbox_c, mut rx_c) = Outbox::new();
        let (outbox_a, mut rx_a) = Outbox::new();
        let watchers = Watchers::default();
        let a = Watcher::new(1, VolumeHandle(1), outbox_a);
        let b = Watcher::new(2, VolumeHandle(5), outbox_b);
        let c = Watcher::new(3, VolumeHandle(6), outbox_c);
        a.saw([1, 10]);
        b.saw([1, 10]);
        c.saw([1]);
        for w in [&a, &b, &c] {
            watchers.add(w.clone());
        }
        let notices =
            [Notice::Entry { parent: 1, name: name("x") }, Notice::Inode { node: 10, offset: 0, len: 4096 }];
        watchers.publish(1, &notices);
        assert!(rx_a.try_recv().is_err(), "the author hears nothing of its own change");
        assert_eq!(rx_b.try_recv().unwrap(), (VolumeHandle(5), notices[0].clone()));
        assert_eq!(rx_b.try_recv().unwrap(), (VolumeHandle(5), notices[1].clone()));
        assert_eq!(rx_c.try_recv().unwrap().1, notices[0], "c saw the directory");
        assert!(rx_c.try_recv().is_err(), "c never saw node 10");
        watchers.remove(&b);
        watchers.publish(1, &notices);
        assert!(rx_b.try_recv().is_err(), "removed");
    }

    #[test]
    fn a_full_queue_becomes_one_all_and_interest_past_its_bound_becomes_everything() {
        let (outbox, mut rx) = Outbox::new();
        let w = Watcher::new(2, VolumeHandle(3), outbox.clone());
        w.saw(0..=INTEREST_MAX as u64);
        assert!(w.cares(u64::MAX), "past the bound: every node");
        let watchers = Watchers::default();
        watchers.add(w);
        for i in 0..QUEUE as i64 + 10 {
            watchers.publish(1, &[Notice::Inode { node: 7 + (i % 2) as u64, offset: i, len: 1 }]);
        }
        let mut queued = Vec::new();
        while let Ok(n) = rx.try_recv() {
            queued.push(n);
        }
        assert_eq!(queued.len(), QUEUE);
        let lost = outbox.take_lost();
        assert_eq!(lost, vec![VolumeHandle(3)]);
        assert_eq!(
            frames(queued, &lost),
            vec![Notices { handle: VolumeHandle(3), notices: vec![Notice::All] }]
        );
    }

    #[test]
    fn frames_merge_repeats_and_split_at_the_frame_limit() {
        let h = VolumeHandle(1);
        let q = vec![
            (h, Notice::Inode { node: 4, offset: 0, len: 10 }),
            (h, Notice::Inode { node: 4, offset: 10, len: 10 }),
            (h, Notice::Inode { node: 4, offset: -1, len: 0 }),
            (VolumeHandle(2), Notice::Entry { parent: 1, name: name("a") }),
            (h, Notice::Entry { parent: 1, name: name("a") }),
            (h, Notice::Entry { parent: 1, name: name("a") }),
            (h, Notice::Inode { node: 5, offset: 100, len: 0 }),
            (h, Notice::Inode { node: 5, offset: 0, len: 10 }),
        ];
        let f = frames(q, &[]);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f[0].notices,
            vec![
                Notice::Inode { node: 4, offset: 0, len: 20 },
                Notice::Entry { parent: 1, name: name("a") },
                Notice::Inode { node: 5, offset: 0, len: 0 },
            ]
        );
        assert_eq!(f[1].handle, VolumeHandle(2));
        let many: Vec<_> = (0..FS_NOTICES_MAX as u64 + 1)
            .map(|n| (h, Notice::Inode { node: n, offset: -1, len: 0 }))
            .collect();
        let f = frames(many, &[]);
        assert_eq!(f.iter().map(|f| f.notices.len()).collect::<Vec<_>>(), vec![FS_NOTICES_MAX, 1]);
    }
}
