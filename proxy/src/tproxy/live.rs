//! What is being proxied right now, TCP connections or UDP sessions: how many, a way to wait
//! until there are none, a way to cut them all (the end of the drain on shutdown), and a
//! way to park them all at a safe point for the next agent (a handover, `crate::handover`).

use std::{
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::relay::park::Flag;

/// The live connections (or sessions) of one kind; `P` is one parked.
pub struct Live<P> {
    count: AtomicUsize,
    changed: Notify,
    cut: Flag,
    /// Raised: each stops at a safe point and lands in `parked`.
    park: Flag,
    parked: Mutex<Vec<P>>,
    /// Ones that cannot be parked (the in-kernel relay): they stay and drain.
    staying: AtomicUsize,
}

impl<P> Default for Live<P> {
    fn default() -> Self {
        Live {
            count: AtomicUsize::new(0),
            changed: Notify::new(),
            cut: Flag::default(),
            park: Flag::default(),
            parked: Mutex::new(Vec::new()),
            staying: AtomicUsize::new(0),
        }
    }
}

impl<P> Live<P> {
    /// Counts one in, until the returned guard is dropped (however its task ends).
    pub fn enter(live: &Arc<Self>) -> LiveGuard<P> {
        live.count.fetch_add(1, Ordering::SeqCst);
        LiveGuard(Arc::clone(live))
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once none is live.
    pub async fn all_closed(&self) {
        self.until(|| self.count() == 0).await;
    }

    /// Ends every live one with a reset (each logs `drain`), and any accepted later.
    pub fn cut(&self) {
        self.cut.raise();
    }

    /// Resolves once [`Self::cut`] was called.
    pub async fn cut_off(&self) {
        self.cut.raised().await;
    }

    /// What each one waits for, besides its traffic, to park.
    pub fn park_flag(&self) -> &Flag {
        &self.park
    }

    /// Stops every one at a safe point (and any accepted or resumed later), and returns
    /// them once all but the ones that cannot be parked have stopped, or once `within` has
    /// passed. The ones not returned go on here.
    pub async fn park_all(&self, within: Duration) -> Vec<P> {
        self.park.raise();
        let settled = self.until(|| self.count() <= self.staying.load(Ordering::SeqCst));
        let _ = tokio::time::timeout(within, settled).await;
        std::mem::take(&mut *self.lock_parked())
    }

    /// The handover failed: the ones resumed from now on run (and are parked) as usual.
    pub fn unpark(&self) {
        self.park.lower();
    }

    /// Called by a task that parked, before it ends, so that what it parked is in the list
    /// before its [`LiveGuard`] counts it out.
    pub fn park_one(&self, parked: P) {
        self.lock_parked().push(parked);
    }

    /// Counts one that cannot be parked, until the returned guard is dropped.
    pub fn staying(&self) -> Staying<'_, P> {
        self.staying.fetch_add(1, Ordering::SeqCst);
        Staying(self)
    }

    fn lock_parked(&self) -> MutexGuard<'_, Vec<P>> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once `done` holds, checking again each time the count changes (registered
    /// before each check, so no change is missed).
    async fn until(&self, done: impl Fn() -> bool) {
        loop {
            let notified = self.changed.notified();
            if done() {
                return;
            }
            notified.await;
        }
    }
}

/// Held by each connection's or session's task; counts it out when dropped.
pub struct LiveGuard<P>(Arc<Live<P>>);

impl<P> Drop for LiveGuard<P> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Held while a connection that cannot be parked lives.
pub struct Staying<'a, P>(&'a Live<P>);

impl<P> Drop for Staying<'_, P> {
    fn drop(&mut self) {
        self.0.staying.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}
