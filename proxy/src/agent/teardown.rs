//! The way back: what a start changed outside the agent, undone in the reverse order of
//! setup, on a clean stop and after a failed start alike.
//!
//! Setup changes, in order (see [`super::start`]): the pin directory (made by the first
//! sysctl record or link pin), the src_valid_mark sysctls, the policy routing, the
//! listeners in the sockmap, then the sk_lookup program and the classifier at each
//! interface (under a clsact qdisc the agent may add, for the netlink attach). The drain
//! closes the listeners; [`Installed::teardown`] undoes the rest, in reverse: the classifier
//! first, so no packet is marked once its route is gone, then each qdisc once no filter is
//! under it, the routing, the sysctls, and last the pin directory, once the links and
//! sysctl records in it are gone.
//!
//! The routes and qdiscs go over netlink, asynchronously, which `Drop` cannot wait for:
//! the teardown is an explicit step of every exit that reaches it. A guard dropped without
//! it (a panic) says loudly what it leaves: what a crash leaves (T12), which the next
//! start takes over and `proxy cleanup` removes. The sysctls have their own guard
//! ([`SrcValidMark`]), which still puts them back.

use log::{error, info, warn};

use crate::{
    ebpf::Classifier,
    error_chain,
    pins::PinDir,
    routing::PolicyRouting,
    src_valid_mark::SrcValidMark,
    tc_filter::{self, ClsactRemoval},
};

use super::interfaces::Interfaces;

/// What the agent installs outside itself, from the loaded classifier on, and the way
/// back: [`teardown`](Self::teardown), or [`leave_attached`](Self::leave_attached).
pub struct Installed {
    /// The programs and maps; the links that attach them, once attached.
    pub classifier: Classifier,
    /// The sysctls `src_valid_mark=1` makes the agent set.
    pub sysctls: SrcValidMark,
    pub routing: PolicyRouting,
    handle: rtnetlink::Handle,
    table: u32,
    /// Whether an exit step ran; the drop says what stays if none did.
    done: bool,
}

impl Installed {
    /// Nothing installed yet: `classifier` is loaded, not attached. The sysctls are those
    /// of `ifaces`, recorded in the classifier's pin directory.
    pub fn new(
        classifier: Classifier,
        ifaces: &[String],
        handle: rtnetlink::Handle,
        table: u32,
        local: bool,
    ) -> Self {
        Installed {
            sysctls: SrcValidMark::new(ifaces.iter().cloned()).with_pins(classifier.pins().clone()),
            routing: PolicyRouting::new(handle.clone(), table).with_local(local),
            classifier,
            handle,
            table,
            done: false,
        }
    }

    /// Undoes everything, in reverse order of setup, whatever of it was done. Errors are
    /// logged: the teardown goes on. The classifier's counters stay readable.
    pub async fn teardown(&mut self, interfaces: &Interfaces) {
        self.done = true;
        self.classifier.detach_all();
        for name in self.classifier.take_clsact_added() {
            if let Some(index) = interfaces.index_of(&name) {
                match tc_filter::remove_clsact(&self.handle, index).await {
                    Ok(ClsactRemoval::Removed) => info!("clsact qdisc removed from {name}"),
                    Ok(ClsactRemoval::KeptInUse(n)) => {
                        info!("clsact qdisc of {name} kept: {n} other filter(s) under it");
                    }
                    Err(e) => warn!("removing the clsact qdisc from {name}: {e}"),
                }
            }
            // Only now: a stop cut short before the qdisc went leaves the mark, and the next
            // agent or `proxy cleanup` removes the qdisc.
            PinDir::clear_mark(&self.classifier.pins().clsact_mark(&name));
        }
        if let Err(e) = self.routing.remove().await {
            error!("removing policy routing: {}", error_chain(&e));
        }
        self.sysctls.restore();
        self.classifier.remove_pin_dir();
    }

    /// The exit of a start that failed after taking over what a crashed run left
    /// ([`Classifier::took_over`]): detaching now would leave no classifier where the crash
    /// had left one (T12). Leaves it all as the crash did: the classifier (now with this
    /// run's program and the same rules), the routing, the sysctls.
    pub fn leave_attached(&mut self) {
        self.done = true;
        error!(
            "the start failed after taking over the classifier a previous run left: it stays \
             attached, with the policy routing, as after a crash, so the rules keep applying \
             (no socket: dropped, or passed with fail-open); fix the cause and start again, or \
             remove it all with `proxy cleanup --table {}`",
            self.table
        );
        self.sysctls.leave_as_is();
    }
}

impl Installed {
    /// The exit of an agent stopped to be replaced (SIGTERM) or handed over: everything
    /// stays, for the next agent to take over (or, handed over, already its own).
    pub fn leave_for_successor(&mut self, handed_over: bool) {
        self.done = true;
        if handed_over {
            info!("the classifier, the routes and the pins are the next agent's now");
        } else {
            warn!(
                "left in place for the next agent: the classifier and the policy routing of \
                 table {} (no socket: dropped, or passed with fail-open, until an agent takes \
                 over); `proxy cleanup --table {}` removes them if none will",
                self.table, self.table
            );
        }
        self.sysctls.leave_as_is();
    }

    /// The exit of a start that failed while the agent it was taking over from still
    /// serves: everything is that agent's, which takes it all back.
    pub fn leave_to_predecessor(&mut self) {
        self.done = true;
        error!("the start failed: the running agent keeps everything and serves on");
        self.sysctls.leave_as_is();
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.done {
            error!(
                "the agent stops without its teardown: what it attached and the policy \
                 routing of table {} stay, as after a crash (a restart takes them over, \
                 `proxy cleanup --table {}` removes them)",
                self.table, self.table
            );
        }
    }
}
