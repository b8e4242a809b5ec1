//! `net.ipv4.conf.*.src_valid_mark=1` and intercepted IPv4 (T8).
//!
//! With src_valid_mark in effect on the ingress interface (`conf.all` OR the interface,
//! `IN_DEV_SRC_VMARK` in include/linux/inetdevice.h), the reverse-path check of a packet
//! the classifier marked (`__fib_validate_source` in net/ipv4/fib_frontend.c) looks the
//! client's address up with the packet's mark, so in the tproxy table, where
//! `local 0.0.0.0/0` makes every address local: the packet is dropped as a martian and
//! every intercepted IPv4 connection times out. Two settings of the ingress interface
//! decide, each as the kernel combines `conf.all` and the interface:
//!
//! * `accept_local` (all OR interface, `IN_DEV_ACCEPT_LOCAL`): with it, a local answer
//!   passes. Needed whenever src_valid_mark is in effect.
//! * `rp_filter` (the larger of all and interface, `IN_DEV_RPFILTER`): strict (1) also wants
//!   the answer's device to be the ingress one, and the tproxy table's route is through
//!   `lo`, so strict mode drops the packet even with `accept_local`. The interface's own
//!   value set to 2 (loose) makes the larger one 2, without touching `conf.all`.
//!
//! IPv6 has no such check. Tailscale sets `conf.all.src_valid_mark=1`, again on each of its
//! restarts, so the agent checks at start and then every [`POLL_INTERVAL`], changes what each
//! attached interface needs, and on exit writes back the previous value of each sysctl it
//! wrote, and of no other. The files are the agent's own network namespace's: the kernel
//! resolves `/proc/sys/net` for the process that opens it.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use log::{error, info, warn};

use crate::{
    error_chain,
    pins::{PinDir, SysctlMark},
};

/// How often the sysctls are read again while the agent runs: three small files, and three
/// per interface at most.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where the per-interface IPv4 settings are, for the calling process's network namespace.
const CONF: &str = "/proc/sys/net/ipv4/conf";

/// Reading or writing a sysctl failed.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// A sysctl file could not be read.
    #[error("reading {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A sysctl file held something other than an integer.
    #[error("{}: not an integer: {text:?}", .path.display())]
    Parse { path: PathBuf, text: String },
    /// A sysctl file could not be written.
    #[error("writing {value} to {}", .path.display())]
    Write {
        path: PathBuf,
        value: u32,
        #[source]
        source: io::Error,
    },
}

/// A sysctl the agent wrote, and what to write back on exit.
#[derive(Debug)]
struct Written {
    path: PathBuf,
    /// As sysctl(8) names it: `net.ipv4.conf.r0.accept_local`.
    name: String,
    /// Also what the pin directory records, for an agent after a crash.
    mark: SysctlMark,
}

/// Keeps intercepted IPv4 deliverable on the attached interfaces while `src_valid_mark` is
/// in effect, and restores what it wrote on [`restore`](Self::restore) or drop.
#[derive(Debug)]
pub(crate) struct SrcValidMark {
    conf: PathBuf,
    ifaces: Vec<String>,
    written: Vec<Written>,
    /// The last error the periodic check logged, so that a lasting one is logged once.
    last_error: Option<String>,
    /// Where each write is recorded, so that what a crashed agent set is put back by the
    /// next one's clean exit, or by `proxy cleanup`.
    pins: Option<PinDir>,
}

impl SrcValidMark {
    /// For `ifaces` (the agent's `--iface`s) in the agent's network namespace. Touches
    /// nothing yet.
    pub(crate) fn new(ifaces: impl IntoIterator<Item = String>) -> Self {
        Self::with_conf(CONF, ifaces)
    }

    fn with_conf(conf: impl Into<PathBuf>, ifaces: impl IntoIterator<Item = String>) -> Self {
        SrcValidMark {
            conf: conf.into(),
            ifaces: ifaces.into_iter().collect(),
            written: Vec::new(),
            last_error: None,
            pins: None,
        }
    }

    /// Records each write in `pins` (see [`PinDir::sysctl_mark`]).
    pub(crate) fn with_pins(mut self, pins: PinDir) -> Self {
        self.pins = Some(pins);
        self
    }

    /// Takes over what an agent that died uncleanly recorded: those sysctls are restored
    /// on this one's exit, as if it had written them.
    fn adopt(&mut self) {
        let Some(pins) = &self.pins else {
            return;
        };
        for mark in pins.sysctl_marks() {
            let path = self.path(&mark.iface, &mark.key);
            if self.written.iter().any(|w| w.path == path) {
                continue;
            }
            let name = sysctl_name(&mark.iface, &mark.key);
            info!(
                "{name}={} was set by an agent that did not stop cleanly (it was {}): it is \
                 put back on exit",
                mark.value, mark.previous
            );
            self.written.push(Written { path, name, mark });
        }
    }

    /// The check at start: an error here means intercepted IPv4 may be dropped, so the
    /// caller refuses to start.
    pub(crate) fn start(&mut self) -> Result<(), SysctlError> {
        self.adopt();
        self.apply()
    }

    /// The periodic check while running: an error is logged (once while it lasts), and
    /// the agent goes on.
    pub(crate) fn recheck(&mut self) {
        match self.apply() {
            Ok(()) => self.last_error = None,
            Err(e) => {
                let text = error_chain(&e);
                if self.last_error.as_ref() != Some(&text) {
                    error!("src_valid_mark check: {text}");
                    self.last_error = Some(text);
                }
            }
        }
    }

    /// Changes what each interface with `src_valid_mark` in effect needs, and logs one line
    /// naming it. What was written before an error is kept for [`restore`](Self::restore).
    fn apply(&mut self) -> Result<(), SysctlError> {
        let all = All {
            src_valid_mark: read(&self.path("all", "src_valid_mark"))? != 0,
            accept_local: read(&self.path("all", "accept_local"))? != 0,
            rp_filter: read(&self.path("all", "rp_filter"))?,
        };
        let mut sources: Vec<String> = Vec::new();
        let mut changed: Vec<String> = Vec::new();
        let mut result = Ok(());
        for iface in self.ifaces.clone() {
            if let Err(e) = self.fix(&iface, &all, &mut sources, &mut changed) {
                result = Err(e);
                break;
            }
        }
        if !changed.is_empty() {
            warn!(
                "src_valid_mark=1 ({}): set {} so that intercepted IPv4 passes the reverse-path \
                 check, which under the tproxy mark finds every source local, through lo; \
                 restored on exit",
                sources.join(", "),
                changed.join(", ")
            );
        }
        result
    }

    /// One interface: writes what it needs, adds where its `src_valid_mark` comes from to
    /// `sources` and `name=value` to `changed` for each sysctl written.
    fn fix(
        &mut self,
        iface: &str,
        all: &All,
        sources: &mut Vec<String>,
        changed: &mut Vec<String>,
    ) -> Result<(), SysctlError> {
        let source = if all.src_valid_mark {
            "conf.all".to_owned()
        } else if read(&self.path(iface, "src_valid_mark"))? != 0 {
            format!("conf.{}", sysctl_iface(iface))
        } else {
            return Ok(());
        };
        let mut wanted = Vec::new();
        if !all.accept_local {
            let previous = read(&self.path(iface, "accept_local"))?;
            if previous == 0 {
                wanted.push(("accept_local", previous, 1));
            }
        }
        let rp_filter = read(&self.path(iface, "rp_filter"))?;
        if all.rp_filter.max(rp_filter) == 1 {
            wanted.push(("rp_filter", rp_filter, 2));
        }
        for (key, previous, value) in wanted {
            let path = self.path(iface, key);
            write(&path, value)?;
            let name = sysctl_name(iface, key);
            changed.push(format!("{name}={value}"));
            if !sources.contains(&source) {
                sources.push(source.clone());
            }
            // Set again after someone reset it: the value to restore is still the first one.
            if !self.written.iter().any(|w| w.path == path) {
                let mark = SysctlMark {
                    iface: iface.to_owned(),
                    key: key.to_owned(),
                    previous,
                    value,
                };
                self.record(&mark);
                self.written.push(Written { path, name, mark });
            }
        }
        Ok(())
    }

    /// Writes back the previous value of every sysctl this wrote, unless someone changed it
    /// since (then it is theirs, and left as is). Logs one line.
    pub(crate) fn restore(&mut self) -> Vec<String> {
        let mut restored = Vec::new();
        for w in std::mem::take(&mut self.written).into_iter().rev() {
            let (previous, value) = (w.mark.previous, w.mark.value);
            match read(&w.path) {
                Ok(now) if now == value => match write(&w.path, previous) {
                    Ok(()) => restored.push(format!("{}={previous}", w.name)),
                    Err(e) => warn!("restoring {}: {}", w.name, error_chain(&e)),
                },
                Ok(now) => warn!(
                    "{} is {now}, not the {value} the agent set: someone changed it, left as is",
                    w.name
                ),
                Err(e) => warn!("restoring {}: {}", w.name, error_chain(&e)),
            }
            if let Some(pins) = &self.pins {
                PinDir::clear_mark(&pins.sysctl_mark(&w.mark));
            }
        }
        restored.reverse();
        if !restored.is_empty() {
            info!("restored {}", restored.join(", "));
        }
        restored
    }

    /// Notes a write in the pin directory; a failure only costs the restore after a crash.
    fn record(&self, mark: &SysctlMark) {
        let Some(pins) = &self.pins else {
            return;
        };
        let path = pins.sysctl_mark(mark);
        if let Err(e) = pins.set_mark(&path) {
            warn!(
                "{}: after a crash this sysctl would not be put back: {}",
                path.display(),
                error_chain(&e)
            );
        }
    }

    /// Leaves what was written as it is, records included (for a classifier left attached
    /// after a failed start that took over a crashed run's).
    pub(crate) fn leave_as_is(&mut self) {
        self.written.clear();
    }

    /// `proxy cleanup`: puts back what the agent of `pins` recorded and removes the records.
    pub(crate) fn restore_recorded(pins: PinDir) -> Vec<String> {
        let mut guard = SrcValidMark::new([]).with_pins(pins);
        guard.adopt();
        guard.restore()
    }

    fn path(&self, dir: &str, key: &str) -> PathBuf {
        self.conf.join(dir).join(key)
    }
}

impl Drop for SrcValidMark {
    /// An agent that fails after the start check still leaves the sysctls as it found them.
    fn drop(&mut self) {
        self.restore();
    }
}

/// The `conf.all` values, read once per check.
struct All {
    src_valid_mark: bool,
    accept_local: bool,
    rp_filter: u32,
}

/// `net.ipv4.conf.<iface>.<key>`, as sysctl(8) names it.
fn sysctl_name(iface: &str, key: &str) -> String {
    format!("net.ipv4.conf.{}.{key}", sysctl_iface(iface))
}

/// sysctl(8) writes a dot in an interface name (`eth0.100`) as a slash.
fn sysctl_iface(iface: &str) -> String {
    iface.replace('.', "/")
}

fn read(path: &Path) -> Result<u32, SysctlError> {
    let text = std::fs::read_to_string(path).map_err(|source| SysctlError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.trim().parse().map_err(|_| SysctlError::Parse {
        path: path.to_owned(),
        text: text.trim().to_owned(),
    })
}

fn write(path: &Path, value: u32) -> Result<(), SysctlError> {
    std::fs::write(path, value.to_string()).map_err(|source| SysctlError::Write {
        path: path.to_owned(),
        value,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory laid out like /proc/sys/net/ipv4/conf, removed on drop.
    struct FakeConf(PathBuf);

    impl FakeConf {
        /// `all`, `r0` and `r1`, every value 0.
        fn new(tag: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("proxy-svm-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for dir in ["all", "r0", "r1"] {
                std::fs::create_dir_all(root.join(dir)).expect("creating the fake conf");
                for key in ["src_valid_mark", "accept_local", "rp_filter"] {
                    std::fs::write(root.join(dir).join(key), "0\n").expect("writing");
                }
            }
            FakeConf(root)
        }

        fn set(&self, dir: &str, key: &str, value: u32) {
            std::fs::write(self.0.join(dir).join(key), format!("{value}\n")).expect("writing");
        }

        fn get(&self, dir: &str, key: &str) -> u32 {
            read(&self.0.join(dir).join(key)).expect("reading")
        }

        /// Every value, for before/after comparisons.
        fn snapshot(&self) -> Vec<u32> {
            ["all", "r0", "r1"]
                .iter()
                .flat_map(|d| {
                    ["src_valid_mark", "accept_local", "rp_filter"].map(|k| self.get(d, k))
                })
                .collect()
        }

        fn guard(&self) -> SrcValidMark {
            SrcValidMark::with_conf(&self.0, ["r0".to_owned(), "r1".to_owned()])
        }
    }

    impl Drop for FakeConf {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn without_src_valid_mark_nothing_is_written() {
        let conf = FakeConf::new("off");
        let before = conf.snapshot();
        let mut guard = conf.guard();
        guard.start().expect("start");
        guard.recheck();
        assert!(guard.written.is_empty());
        drop(guard);
        assert_eq!(conf.snapshot(), before);
    }

    #[test]
    fn conf_all_sets_accept_local_on_every_interface_and_restores_it() {
        let conf = FakeConf::new("all");
        conf.set("all", "src_valid_mark", 1);
        conf.set("r1", "accept_local", 1);
        let before = conf.snapshot();
        let mut guard = conf.guard();
        guard.start().expect("start");
        assert_eq!(conf.get("r0", "accept_local"), 1);
        // r1 already accepts local sources; conf.all is never written.
        assert_eq!(guard.written.len(), 1);
        assert_eq!(guard.written[0].name, "net.ipv4.conf.r0.accept_local");
        assert_eq!(conf.get("all", "accept_local"), 0);
        guard.restore();
        assert_eq!(conf.snapshot(), before);
    }

    #[test]
    fn an_interface_setting_counts_only_for_that_interface() {
        let conf = FakeConf::new("iface");
        let mut guard = conf.guard();
        guard.start().expect("start");
        conf.set("r1", "src_valid_mark", 1);
        let before = conf.snapshot();
        guard.recheck();
        assert_eq!(conf.get("r0", "accept_local"), 0);
        assert_eq!(conf.get("r1", "accept_local"), 1);
        drop(guard);
        assert_eq!(conf.snapshot(), before);
    }

    #[test]
    fn accept_local_in_conf_all_is_enough() {
        let conf = FakeConf::new("all-al");
        conf.set("all", "src_valid_mark", 1);
        conf.set("all", "accept_local", 1);
        let mut guard = conf.guard();
        guard.start().expect("start");
        assert!(guard.written.is_empty());
        assert_eq!(conf.get("r0", "accept_local"), 0);
    }

    #[test]
    fn strict_rp_filter_becomes_loose_on_the_interface_only() {
        let conf = FakeConf::new("rp");
        conf.set("all", "src_valid_mark", 1);
        conf.set("all", "rp_filter", 1);
        conf.set("r1", "rp_filter", 2);
        let before = conf.snapshot();
        let mut guard = conf.guard();
        guard.start().expect("start");
        assert_eq!(conf.get("r0", "rp_filter"), 2);
        assert_eq!(conf.get("all", "rp_filter"), 1);
        let names: Vec<&str> = guard.written.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "net.ipv4.conf.r0.accept_local",
                "net.ipv4.conf.r0.rp_filter",
                "net.ipv4.conf.r1.accept_local",
            ]
        );
        drop(guard);
        assert_eq!(conf.snapshot(), before);

        // Loose already, or off: rp_filter is left alone.
        conf.set("all", "rp_filter", 0);
        conf.set("r0", "rp_filter", 0);
        let mut guard = conf.guard();
        guard.start().expect("start");
        assert!(guard.written.iter().all(|w| !w.name.ends_with("rp_filter")));
    }

    #[test]
    fn a_reset_is_fixed_again_and_the_first_value_restored() {
        let conf = FakeConf::new("reset");
        conf.set("all", "src_valid_mark", 1);
        let mut guard = conf.guard();
        guard.start().expect("start");
        conf.set("r0", "accept_local", 0);
        guard.recheck();
        assert_eq!(conf.get("r0", "accept_local"), 1);
        assert_eq!(guard.written.len(), 2, "{:?}", guard.written);
        guard.restore();
        assert_eq!(conf.get("r0", "accept_local"), 0);
        assert_eq!(conf.get("r1", "accept_local"), 0);
    }

    #[test]
    fn a_value_someone_else_changed_is_left_as_is() {
        let conf = FakeConf::new("theirs");
        conf.set("all", "src_valid_mark", 1);
        let mut guard = conf.guard();
        guard.start().expect("start");
        conf.set("r0", "accept_local", 2);
        guard.restore();
        assert_eq!(conf.get("r0", "accept_local"), 2);
        assert_eq!(conf.get("r1", "accept_local"), 0);
    }

    #[test]
    fn errors_name_the_file() {
        let conf = FakeConf::new("err");
        conf.set("all", "src_valid_mark", 1);
        std::fs::remove_file(conf.0.join("r1").join("accept_local")).expect("remove");
        let mut guard = conf.guard();
        let e = guard.start().expect_err("a missing file");
        let text = error_chain(&e);
        assert!(text.starts_with("reading "), "{text}");
        assert!(text.contains("r1/accept_local"), "{text}");
        // What was written before the error is still restored.
        assert_eq!(conf.get("r0", "accept_local"), 1);
        drop(guard);
        assert_eq!(conf.get("r0", "accept_local"), 0);

        std::fs::write(conf.0.join("all").join("src_valid_mark"), "x\n").expect("write");
        let e = conf.guard().start().expect_err("not a number");
        assert!(error_chain(&e).contains("not an integer: \"x\""), "{e}");
    }

    #[test]
    fn sysctl_names_write_dots_in_interface_names_as_slashes() {
        assert_eq!(sysctl_iface("eth0.100"), "eth0/100");
    }
}
