//! Parking a relay: stopping it at a safe point so that another agent can resume it, with
//! no byte lost and none sent twice (issue 19, `docs/handover.md`).
//!
//! A relay is two sockets plus the bytes the agent holds between a read and the write that
//! passes them on. Every await point of a direction is one of two kinds:
//! * waiting for its source to be readable: the agent holds nothing, the bytes not yet read
//!   wait in the kernel's receive queue, and the next agent reads them;
//! * waiting for its destination to be writable, holding the rest of a read (copy) or the
//!   bytes in the splice pipe: those are taken out and handed over, and the next agent
//!   writes them before it reads anything more from that source.
//!
//! Each such wait also waits for the park [`Flag`]; once it is raised, a direction stops at
//! its next await point and says what it holds ([`Halt::Parked`]). A direction that
//! already passed its EOF on is finished and stays so.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::{net::TcpStream, sync::Notify};

/// A level-triggered signal: once raised it stays raised, and every wait for it, before or
/// after, resolves.
#[derive(Default)]
pub struct Flag {
    raised: AtomicBool,
    notify: Notify,
}

impl Flag {
    /// A flag nobody raises: for relays that cannot be parked.
    pub const fn never() -> Self {
        Flag {
            raised: AtomicBool::new(false),
            notify: Notify::const_new(),
        }
    }

    pub fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Lowers it again: waits from now on wait for the next raise.
    pub fn lower(&self) {
        self.raised.store(false, Ordering::SeqCst);
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Resolves once the flag is raised (at once if it is). Cancel-safe.
    pub async fn raised(&self) {
        loop {
            // Registered before the check, so a raise in between is not missed.
            let notified = self.notify.notified();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

/// How one direction of a relay stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Halt {
    /// Its source sent everything, and the EOF was passed on.
    Eof,
    /// Parked: these bytes were read from the source and not yet written to the
    /// destination (possibly none).
    Parked(Vec<u8>),
}

/// One direction of a parked relay.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirectionState {
    /// Bytes relayed so far (for the closing log line and the metrics).
    pub total: u64,
    /// Its EOF was passed on: nothing more is read from its source.
    pub finished: bool,
    /// Read from the source, not yet written to the destination: written first on resume.
    pub pending: Vec<u8>,
}

/// A relay stopped at a safe point, with everything needed to resume it elsewhere.
pub struct ParkedRelay {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Client to upstream.
    pub up: DirectionState,
    /// Upstream to client.
    pub down: DirectionState,
    /// One direction has half-closed its destination already (see `relay::Fins`).
    pub first_fin_passed: bool,
}

impl ParkedRelay {
    /// A relay about to start: nothing relayed, nothing held.
    pub fn new(client: TcpStream, upstream: TcpStream) -> Self {
        ParkedRelay {
            client,
            upstream,
            up: DirectionState::default(),
            down: DirectionState::default(),
            first_fin_passed: false,
        }
    }

    /// Nothing relayed yet: any relay mode may take it.
    pub fn is_fresh(&self) -> bool {
        self.up == DirectionState::default()
            && self.down == DirectionState::default()
            && !self.first_fin_passed
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_raised_flag_resolves_every_wait_before_and_after() {
        let flag = std::sync::Arc::new(Flag::default());
        let waiter = {
            let flag = std::sync::Arc::clone(&flag);
            tokio::spawn(async move { flag.raised().await })
        };
        tokio::task::yield_now().await;
        assert!(!flag.is_raised());
        flag.raise();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter before the raise was not woken")
            .expect("waiter");
        tokio::time::timeout(Duration::from_secs(5), flag.raised())
            .await
            .expect("a wait after the raise did not resolve");
    }

    #[tokio::test]
    async fn the_never_flag_never_resolves() {
        static NEVER: Flag = Flag::never();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), NEVER.raised())
                .await
                .is_err()
        );
    }
}
