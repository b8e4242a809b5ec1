//! Whether the classifier must look for a transparent socket for the packets that match no
//! rule: the return path (T8), the recipe's `-m socket --transparent -j DIVERT`.
//!
//! That lookup costs every packet no rule covers (a socket lookup per packet of traffic
//! that is none of the proxy's business), so the agent tells the classifier to skip it
//! whenever no socket can need it ([`proxy_common::GlobalConfig::skip_return_path`]). The
//! sockets that can need it, and so keep the lookup on:
//!
//! * a proxy's own transparent sockets with foreign tuples: an external listener's (we
//!   cannot know them) and the upstream sockets of `--spoof-source`, bound to the clients'
//!   addresses. Either keeps the lookup on for the whole run;
//! * connections and UDP sessions the built-in listener accepted under rules a reload
//!   removed or changed: their packets may match no rule any more, and only the return
//!   path still finds their sockets. A reload turns the lookup on before its switch, and
//!   it stays on until every connection and session accepted before the switch (or in
//!   [`GRACE`] after it: a handshake the old rules began is accepted later) has ended.
//!
//! Under the built-in listener's rules that do not change, a connection's packets always
//! match a rule, whose established lookup finds its socket (T2): no return path needed.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// After a reload's switch, connections accepted this long still count as accepted under
/// the old rules: the kernel may have begun their handshake under them (a SYN assigned to
/// the listener before the switch sits in the accept queue until a worker takes it).
pub const GRACE: Duration = Duration::from_secs(5);

/// How often the agent asks [`ReturnPath::needed`] again, to turn the lookup off once the
/// old connections are gone.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Live connections and sessions, counted by the rule set they were accepted under.
pub struct ReturnPath {
    /// Why the lookup stays on for the whole run, if it does.
    always: Option<&'static str>,
    generations: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    /// Connections accepted under the rules in force.
    current: Arc<AtomicUsize>,
    /// Connections accepted under earlier rule sets, one count per reload; a count is
    /// dropped once it reaches zero.
    older: Vec<Arc<AtomicUsize>>,
    /// Until then, `current` still counts connections that the previous rules may have
    /// begun: it joins `older` when this passes.
    grace_until: Option<Instant>,
}

/// Held by a connection's or session's task: counts it out when dropped.
pub struct Accepted(Arc<AtomicUsize>);

impl Drop for Accepted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ReturnPath {
    /// `always`: why every packet needs the lookup for the whole run (an external
    /// listener, `--spoof-source`), or `None`.
    pub fn new(always: Option<&'static str>) -> Self {
        ReturnPath {
            always,
            generations: Mutex::default(),
        }
    }

    /// Counts a connection or session the built-in listener just accepted, until the
    /// returned guard is dropped.
    pub fn accepted(&self) -> Accepted {
        let generations = self.lock();
        generations.current.fetch_add(1, Ordering::Relaxed);
        Accepted(Arc::clone(&generations.current))
    }

    /// A reload is about to switch the rules (or a handover brings connections another
    /// agent accepted under its own): from now on, what was accepted so far (and what is
    /// accepted in the next [`GRACE`]) may have no rule left.
    pub fn rules_changing(&self) {
        self.rules_changing_at(Instant::now());
    }

    fn rules_changing_at(&self, now: Instant) {
        let mut generations = self.lock();
        let previous = std::mem::take(&mut generations.current);
        generations.older.push(previous);
        generations.grace_until = Some(now + GRACE);
    }

    /// Whether the classifier must look up the return path now, and if so why.
    pub fn needed(&self) -> Option<&'static str> {
        self.needed_at(Instant::now())
    }

    fn needed_at(&self, now: Instant) -> Option<&'static str> {
        if self.always.is_some() {
            return self.always;
        }
        let mut generations = self.lock();
        if generations.grace_until.is_some_and(|until| now >= until) {
            generations.grace_until = None;
            let settled = std::mem::take(&mut generations.current);
            generations.older.push(settled);
        }
        generations
            .older
            .retain(|count| count.load(Ordering::Relaxed) > 0);
        if generations.grace_until.is_some() {
            Some("the rules changed moments ago (a reload, or a handover)")
        } else if !generations.older.is_empty() {
            Some("connections accepted under earlier rules (or by the previous agent) are live")
        } else {
            None
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // A panic while holding the lock leaves plain counts behind: still usable.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_lookup_until_a_reload_and_none_once_its_connections_ended() {
        let path = ReturnPath::new(None);
        let start = Instant::now();
        let before = path.accepted();
        assert_eq!(path.needed_at(start), None, "rules never changed");

        path.rules_changing_at(start);
        assert!(path.needed_at(start).is_some(), "in the grace period");
        // Accepted in the grace period: may have been begun by the old rules.
        let in_grace = path.accepted();
        let after_grace = start + GRACE;
        drop(before);
        assert!(
            path.needed_at(after_grace).is_some(),
            "one accepted in the grace period is live"
        );
        // Accepted once the grace period is over: under the new rules.
        let later = path.accepted();
        drop(in_grace);
        assert_eq!(path.needed_at(after_grace), None);
        drop(later);
        assert_eq!(path.needed_at(after_grace), None);
    }

    #[test]
    fn a_connection_from_two_reloads_ago_keeps_the_lookup_on() {
        let path = ReturnPath::new(None);
        let start = Instant::now();
        let oldest = path.accepted();
        path.rules_changing_at(start);
        path.rules_changing_at(start + GRACE);
        let much_later = start + GRACE * 3;
        assert!(path.needed_at(much_later).is_some());
        drop(oldest);
        assert_eq!(path.needed_at(much_later), None);
    }

    #[test]
    fn a_reload_with_nothing_live_needs_the_lookup_for_the_grace_period_only() {
        let path = ReturnPath::new(None);
        let start = Instant::now();
        path.rules_changing_at(start);
        assert!(path.needed_at(start + GRACE / 2).is_some());
        assert_eq!(path.needed_at(start + GRACE), None);
    }

    #[test]
    fn an_external_listener_or_spoofed_sources_need_it_always() {
        let path = ReturnPath::new(Some("--spoof-source"));
        assert_eq!(path.needed(), Some("--spoof-source"));
    }
}
