//! Serving a request on a thread that must not wait for the store (the
//! virtio queue's own thread): what the view can answer from memory or a
//! local disk it answers there, with no hand-off to another thread; a
//! request that would wait for a remote store is *deferred* instead (the
//! caller runs it again on a worker). Everything a deferred attempt did
//! that the guest will never see (inode references handed out in the
//! discarded reply) is undone.
use std::cell::{Cell, RefCell};

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
    static DEFERRED: Cell<bool> = const { Cell::new(false) };
    /// Inode references taken during the inline attempt.
    static LOOKUPS: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// The guest had more requests queued behind this one.
    static OTHERS_WAITING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with [`others_waiting`] answering `waiting`: the transport
/// tells the view whether the guest queued more requests behind this one.
pub fn with_others_waiting<T>(waiting: bool, f: impl FnOnce() -> T) -> T {
    OTHERS_WAITING.set(waiting);
    let out = f();
    OTHERS_WAITING.set(false);
    out
}

/// Whether the guest had more requests queued behind the one being served
/// (it keeps several in flight, so the disk is already kept busy by them).
pub fn others_waiting() -> bool {
    OTHERS_WAITING.get()
}

/// Runs `f` as an inline attempt; answers its result and whether it was
/// deferred, having called `undo` with every inode reference it took.
pub fn attempt<T>(f: impl FnOnce() -> T, undo: impl Fn(u64)) -> (T, bool) {
    INLINE.set(true);
    DEFERRED.set(false);
    let out = f();
    INLINE.set(false);
    let deferred = DEFERRED.replace(false);
    let taken = LOOKUPS.with_borrow_mut(std::mem::take);
    if deferred {
        for ino in taken {
            undo(ino);
        }
    }
    (out, deferred)
}

/// Called where the view would wait for the store: inside an inline
/// attempt it marks the request deferred and answers true.
pub fn defer() -> bool {
    if INLINE.get() {
        DEFERRED.set(true);
        true
    } else {
        false
    }
}

/// Records an inode reference taken, to undo if the attempt is deferred.
pub fn took(ino: u64) {
    if INLINE.get() {
        LOOKUPS.with_borrow_mut(|l| l.push(ino));
    }
}
