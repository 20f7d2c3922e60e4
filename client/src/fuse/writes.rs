//! Asynchronous writes of an fs mount (NFS's and sshfs's default): the kernel's WRITE is answered
//! as soon as it is sent to the server, so one writer keeps several in flight instead of waiting a
//! round trip for each. What makes that safe is kept here:
//! - a write that overlaps one still in flight waits for it (the server's file workers may run two
//!   requests in either order);
//! - every other request on the inode (open, read, getattr, setattr, flush, fsync, release,
//!   locks...) waits until the writes in flight when it came have ended (not later ones: a steady
//!   writer cannot starve a `stat`), so it sees what was written, and a reply carrying
//!   attributes never gives the kernel a size from before a write it was told is done;
//! - a reply that may carry any inode's attributes (lookup, readdirplus, create, link) first waits
//!   for every write that started before it;
//! - the error of a write is given once to every fh that was open when it happened, at its next
//!   write, flush (close) or fsync (errseq, as Linux and NFS do: a reader's close does not take
//!   the writer's error): a `close` or `fsync` that succeeds means no write before it failed
//!   since the fh was told last;
//! - in-flight bytes are bounded ([`Writes::new`]): a writer past the bound waits.
//!
//! O_SYNC / O_DSYNC / O_APPEND writes, and every write of a mount with `--sync-writes`, stay
//! synchronous (see `FsFiles::write`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// In-flight write bytes of a mount, by default (beyond: the writer waits).
pub const WRITES_IN_FLIGHT_BYTES: u64 = 32 << 20;

#[derive(Debug, Default)]
struct Inode {
    /// write id -> [start, end).
    ranges: BTreeMap<u64, (u64, u64)>,
    /// The latest error of a write, and its number (see `Fh`).
    error: Option<(i32, u64)>,
    /// Open fhs of the inode (while there are, its error is kept for them).
    fhs: u32,
}

/// An open file: the error numbers it has seen. Each error is reported once to every fh that
/// was open when it happened (errseq, as Linux and NFS do), so a reader's close never takes the
/// writer's error.
#[derive(Debug)]
struct Fh {
    node: u64,
    seen: u64,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    fhs: HashMap<u64, Fh>,
    /// Every write in flight: id -> its inode.
    all: BTreeMap<u64, u64>,
    bytes: u64,
    next: u64,
    /// The number of the last error (errors of all inodes are numbered in one sequence).
    errors: u64,
}

/// A mount's writes in flight.
#[derive(Debug)]
pub struct Writes {
    state: Mutex<State>,
    changed: Condvar,
    limit: u64,
}

/// A started write: [`Started::end`] it with the result. One dropped without an end (its reply
/// never came: the mount is going away) ends as EIO, so nothing waits for it forever.
#[derive(Debug)]
#[must_use]
pub struct Started {
    writes: Arc<Writes>,
    node: u64,
    id: u64,
    len: u64,
    ended: bool,
}

impl Started {
    /// Ends the write; a failure (`Err(errno)`) is kept for the inode's next write, flush or fsync.
    pub fn end(mut self, result: Result<(), i32>) {
        self.ended = true;
        self.writes.end(self.node, self.id, self.len, result);
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if !self.ended {
            self.writes.end(self.node, self.id, self.len, Err(libc::EIO));
        }
    }
}

impl Writes {
    pub fn new(limit: u64) -> Self {
        Self { state: Mutex::default(), changed: Condvar::new(), limit: limit.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// An fh of `node` was opened: if it may write, it is told of errors from now on (a
    /// read-only one never is: its close is not where a writer's failure belongs).
    pub fn opened(&self, fh: u64, node: u64, writable: bool) {
        let mut g = self.lock();
        let seen = if writable { g.errors } else { u64::MAX };
        if let Some(old) = g.fhs.insert(fh, Fh { node, seen }) {
            g.forget_fh(old.node);
        }
        g.inodes.entry(node).or_default().fhs += 1;
    }

    /// An fh was released.
    pub fn released(&self, fh: u64) {
        let mut g = self.lock();
        if let Some(f) = g.fhs.remove(&fh) {
            g.forget_fh(f.node);
        }
    }

    /// Starts a write of `len` bytes at `offset` of `node` through `fh`, once no write in flight
    /// overlaps it and the bytes in flight allow it; or gives an error of an earlier write that
    /// `fh` has not been told of.
    pub fn begin(self: &Arc<Self>, node: u64, fh: u64, offset: u64, len: u64) -> Result<Started, i32> {
        let end = offset.saturating_add(len.max(1));
        let mut g = self.lock();
        loop {
            if let Some(e) = g.unseen_error(node, fh) {
                return Err(e);
            }
            let overlaps =
                g.inodes.get(&node).is_some_and(|i| i.ranges.values().any(|&(s, e)| s < end && offset < e));
            // One write always goes, however large: the bound never stops all progress.
            let full = g.bytes > 0 && g.bytes + len > self.limit;
            if !overlaps && !full {
                break;
            }
            g = self.wait(g);
        }
        let id = g.next;
        g.next += 1;
        g.inodes.entry(node).or_default().ranges.insert(id, (offset, end));
        g.all.insert(id, node);
        g.bytes += len;
        Ok(Started { writes: self.clone(), node, id, len, ended: false })
    }

    fn end(&self, node: u64, id: u64, len: u64, result: Result<(), i32>) {
        let mut g = self.lock();
        g.bytes -= len;
        g.all.remove(&id);
        // A failure is the inode's latest error, with a new number: every fh not told of it yet
        // is told once.
        let error = result.err().map(|e| {
            g.errors += 1;
            (e, g.errors)
        });
        if let Some(i) = g.inodes.get_mut(&node) {
            i.ranges.remove(&id);
            if error.is_some() {
                i.error = error;
            }
        }
        g.tidy(node);
        drop(g);
        self.changed.notify_all();
    }

    /// Waits until the writes of `node` in flight now have ended (not later ones, so a steady
    /// writer cannot starve the caller); true if it waited.
    pub fn settle(&self, node: u64) -> bool {
        let mut g = self.lock();
        let Some(last) = g.inodes.get(&node).and_then(|i| i.ranges.keys().next_back().copied()) else {
            return false;
        };
        while g
            .inodes
            .get(&node)
            .and_then(|i| i.ranges.keys().next().copied())
            .is_some_and(|first| first <= last)
        {
            g = self.wait(g);
        }
        true
    }

    /// As `settle`, then gives an error of a write of `node` that `fh` has not been told of.
    pub fn settle_and_take_error(&self, node: u64, fh: u64) -> Result<(), i32> {
        self.settle(node);
        self.lock().unseen_error(node, fh).map_or(Ok(()), Err)
    }

    /// Waits until every write that is in flight now has ended (later ones are not waited for, so
    /// a steady stream of writes cannot starve the caller).
    pub fn barrier(&self) {
        self.barrier_until(None);
    }

    /// As `barrier`, for at most `limit`; the bytes still in flight then (0: all ended).
    pub fn barrier_for(&self, limit: std::time::Duration) -> u64 {
        self.barrier_until(std::time::Instant::now().checked_add(limit))
    }

    fn barrier_until(&self, deadline: Option<std::time::Instant>) -> u64 {
        let mut g = self.lock();
        let Some(last) = g.all.keys().next_back().copied() else { return 0 };
        while g.all.keys().next().is_some_and(|&first| first <= last) {
            g = match deadline {
                None => self.wait(g),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return g.bytes;
                    }
                    self.changed.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
        0
    }

    /// Bytes in flight (for tests).
    pub fn in_flight(&self) -> u64 {
        self.lock().bytes
    }
}

impl State {
    /// The error of `node` that `fh` has not seen (now seen). An fh this side never saw opened
    /// (none should be) sees every error.
    fn unseen_error(&mut self, node: u64, fh: u64) -> Option<i32> {
        let (e, n) = self.inodes.get(&node)?.error?;
        let seen = self.fhs.get(&fh).map_or(0, |f| f.seen);
        if n <= seen {
            return None;
        }
        match self.fhs.get_mut(&fh) {
            Some(f) => f.seen = n,
            // Not seen opened (none should be): it is told from now on, like the others.
            None => {
                self.fhs.insert(fh, Fh { node, seen: n });
                self.inodes.entry(node).or_default().fhs += 1;
            }
        }
        Some(e)
    }

    fn forget_fh(&mut self, node: u64) {
        if let Some(i) = self.inodes.get_mut(&node) {
            i.fhs = i.fhs.saturating_sub(1);
        }
        self.tidy(node);
    }

    /// Drops what `node` no longer needs: nothing in flight and no fh open (its count of open fhs
    /// must outlive its writes, or a later error would be dropped as nobody's).
    fn tidy(&mut self, node: u64) {
        if self.inodes.get(&node).is_some_and(|i| i.ranges.is_empty() && i.fhs == 0) {
            self.inodes.remove(&node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later(s: Started, r: Result<(), i32>, ms: u64) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            s.end(r)
        })
    }

    #[test]
    fn an_overlapping_write_waits_for_the_one_in_flight_and_others_do_not() {
        let w = Arc::new(Writes::new(1 << 20));
        let a = w.begin(1, 0, 0, 4096).unwrap();
        // Another range, another inode: no wait.
        let b = w.begin(1, 0, 4096, 4096).unwrap();
        let c = w.begin(2, 0, 0, 4096).unwrap();
        let t = later(a, Ok(()), 100);
        let start = std::time::Instant::now();
        let d = w.begin(1, 0, 100, 10).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(90), "began before the overlapping write ended");
        t.join().unwrap();
        for s in [b, c, d] {
            s.end(Ok(()));
        }
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn an_error_is_given_once_to_each_fh_open_when_it_happened() {
        let w = Arc::new(Writes::new(1 << 20));
        // The writer (10), another writer of the same file (11), a reader (13: never told).
        w.opened(10, 7, true);
        w.opened(11, 7, true);
        w.opened(13, 7, false);
        // A write that succeeds first: the inode's record of open fhs outlives it.
        w.begin(7, 10, 0, 10).unwrap().end(Ok(()));
        let a = w.begin(7, 10, 0, 10).unwrap();
        a.end(Err(libc::ENOSPC));
        // Opened after the error: not told.
        w.opened(12, 7, true);
        // The writer's next write is told, then its close is not told again.
        assert_eq!(w.begin(7, 10, 20, 10).unwrap_err(), libc::ENOSPC);
        assert_eq!(w.settle_and_take_error(7, 10), Ok(()));
        // The other writer's close is told once too: the first did not take it.
        assert_eq!(w.settle_and_take_error(7, 11), Err(libc::ENOSPC));
        assert_eq!(w.settle_and_take_error(7, 11), Ok(()));
        assert_eq!(w.settle_and_take_error(7, 12), Ok(()));
        assert_eq!(w.settle_and_take_error(7, 13), Ok(()));
        // A later error is a new one for everybody.
        let b = w.begin(7, 12, 0, 10).unwrap();
        b.end(Err(libc::EIO));
        assert_eq!(w.settle_and_take_error(7, 10), Err(libc::EIO));
        assert_eq!(w.settle_and_take_error(7, 12), Err(libc::EIO));
        // A write whose reply never came (dropped) ends as EIO.
        drop(w.begin(7, 10, 0, 10).unwrap());
        assert_eq!(w.settle_and_take_error(7, 10), Err(libc::EIO));
        for fh in [10, 11, 12, 13] {
            w.released(fh);
        }
        assert_eq!(w.in_flight(), 0);
        assert!(w.lock().inodes.is_empty(), "a released inode's error was kept");
    }

    #[test]
    fn settle_waits_for_the_inode_and_the_bound_holds_back_a_writer() {
        let w = Arc::new(Writes::new(8192));
        let a = w.begin(1, 0, 0, 8192).unwrap();
        let t = later(a, Ok(()), 100);
        let start = std::time::Instant::now();
        // Over the bound: waits for the first to end.
        let b = w.begin(2, 0, 0, 4096).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(90), "the bound did not hold");
        t.join().unwrap();
        let t = later(b, Ok(()), 100);
        let start = std::time::Instant::now();
        w.settle(3);
        assert!(start.elapsed() < Duration::from_millis(50), "settle waited for another inode");
        w.settle(2);
        assert!(start.elapsed() >= Duration::from_millis(90), "settle did not wait");
        t.join().unwrap();
        // A write larger than the bound still goes when nothing is in flight.
        let big = w.begin(1, 0, 0, 1 << 20).unwrap();
        big.end(Ok(()));
    }

    #[test]
    fn settle_does_not_wait_for_writes_begun_after_it() {
        let w = Arc::new(Writes::new(1 << 20));
        let a = w.begin(1, 0, 0, 10).unwrap();
        let (w2, (tx, rx)) = (w.clone(), std::sync::mpsc::channel());
        std::thread::spawn(move || tx.send(w2.settle(1)));
        std::thread::sleep(Duration::from_millis(20));
        // A steady writer: a new write of the inode begins before the old one ends.
        let b = w.begin(1, 0, 100, 10).unwrap();
        a.end(Ok(()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true), "settle waited for a later write");
        // Returned while `b` is still in flight.
        assert_eq!(w.in_flight(), 10);
        b.end(Ok(()));
    }

    #[test]
    fn the_barrier_waits_for_writes_before_it_only() {
        let w = Arc::new(Writes::new(1 << 20));
        let a = w.begin(1, 0, 0, 10).unwrap();
        let t = later(a, Ok(()), 100);
        let start = std::time::Instant::now();
        w.barrier();
        assert!(start.elapsed() >= Duration::from_millis(90), "the barrier did not wait");
        t.join().unwrap();
        let b = w.begin(1, 0, 0, 10).unwrap();
        let w2 = w.clone();
        let waiter = std::thread::spawn(move || w2.barrier());
        std::thread::sleep(Duration::from_millis(20));
        // A write begun after the barrier does not hold it.
        let c = w.begin(2, 0, 0, 10).unwrap();
        b.end(Ok(()));
        waiter.join().unwrap();
        c.end(Ok(()));
        // Bounded: gives up, with the bytes still in flight.
        let d = w.begin(1, 0, 0, 10).unwrap();
        assert_eq!(w.barrier_for(Duration::from_millis(50)), 10);
        let t = later(d, Ok(()), 50);
        assert_eq!(w.barrier_for(Duration::from_secs(5)), 0);
        t.join().unwrap();
    }
}
