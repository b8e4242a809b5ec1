//! Least privilege: the capabilities the agent needs to set up (checked before anything
//! changes, whatever the user: root, or a service user given them as ambient capabilities),
//! and the smaller set it keeps once set up ([`KEPT`], plus CAP_BPF on kernels that ask it of
//! every `bpf()` call: [`bpf_calls_need_cap_bpf`]), dropped in every thread.
//!
//! Capabilities belong to threads, not processes (`capset(2)` changes the calling thread's,
//! like the bounding set and `no_new_privs`), and by the end of the setup the agent has many
//! threads: tokio's workers, the TCP workers, blocking-pool threads. So [`drop_to_kept`]
//! does what glibc does for `setuid` in a threaded process: it drops in the calling thread,
//! then signals each other thread of the process (`tgkill`, listed in `/proc/self/task`),
//! whose handler makes the same system calls, and checks every thread's
//! `/proc/self/task/TID/status` afterwards. A thread created meanwhile inherits its
//! creator's credentials, dropped or not: the listing is repeated until it finds no thread
//! it has not signalled.

use std::{
    collections::HashSet,
    fmt,
    sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use caps::{CapSet, Capability};

/// What the running agent keeps after its setup, and why each (found by running every
/// kernel test with the agent dropped to this set):
///
/// - `CAP_NET_ADMIN`: a reload's policy routes (netlink), `IP_TRANSPARENT` on a reload's
///   new listeners and on spoofed-source upstream sockets, `SO_MARK` on every upstream
///   socket (`--outbound-mark`), the classifier attached again to an interface made again
///   (a TCX link, or a cls_bpf filter), the src_valid_mark sysctls (the kernel grants the
///   owner's access to a network namespace's `/proc/sys/net` files to CAP_NET_ADMIN in
///   that namespace, `net_ctl_permissions`, so no CAP_DAC_OVERRIDE), and the teardown.
/// - `CAP_NET_BIND_SERVICE`: a reload that brings an on-port below 1024.
///
/// Not kept: `CAP_BPF` (after the setup the agent only uses the map, program and link
/// descriptors it holds, and pins in its own directory, none of which asks for it: reloads,
/// address changes, re-attaching and the teardown were tested without it), `CAP_PERFMON`
/// (only the verifier wants it, at load time), `CAP_NET_RAW` (its one use here,
/// `IP_TRANSPARENT`, is covered by CAP_NET_ADMIN), `CAP_SYS_ADMIN` (mounting bpffs when it
/// is not mounted, at start only) and everything else.
///
/// The exception: before Linux 6.5, while `kernel.unprivileged_bpf_disabled` is set
/// (Debian's default), `__sys_bpf` refuses every command, a map lookup on a descriptor the
/// agent holds included, to a thread without CAP_BPF or CAP_SYS_ADMIN. On such a kernel
/// the agent keeps CAP_BPF too ([`bpf_calls_need_cap_bpf`] measures it), or it could read
/// no counter and apply no reload.
pub const KEPT: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_BIND_SERVICE];

/// What `proxy run` cannot start without: loading programs and BTF (CAP_BPF; CAP_PERFMON for
/// the verifier's pointer checks), attaching them, routing, sysctls, transparent sockets
/// (CAP_NET_ADMIN). CAP_NET_BIND_SERVICE is wanted only for on-ports below 1024 (binding
/// says so), CAP_SYS_ADMIN only when bpffs is not mounted (mounting it says so).
pub const REQUIRED: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
];

/// The agent lacks capabilities it cannot start without, or could not drop the others.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Reading the calling thread's capabilities failed.
    #[error("reading this process's capabilities")]
    Read(#[source] caps::errors::CapsError),
    /// Capabilities `proxy run` needs are not in its effective set.
    #[error(
        "missing capabilities {}: run as root, or give the user {} (systemd: AmbientCapabilities=; setpriv --inh-caps/--ambient-caps)",
        names(.0), names(&REQUIRED)
    )]
    Missing(Vec<Capability>),
    /// A thread did not end with only [`KEPT`].
    #[error("dropping capabilities: {0}")]
    Drop(String),
}

/// Checks that the calling thread has every capability in [`REQUIRED`] in effect.
pub fn check_required() -> Result<(), PrivilegeError> {
    let effective = caps::read(None, CapSet::Effective).map_err(PrivilegeError::Read)?;
    let missing: Vec<Capability> = REQUIRED
        .iter()
        .filter(|c| !effective.contains(c))
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing(missing))
    }
}

/// `cap_net_admin,cap_bpf`, as `capsh` writes them.
pub fn names(caps: &[Capability]) -> String {
    caps.iter()
        .map(|c| c.to_string().to_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

/// The set the threads are dropped to, as capset's two 32-bit words, and the highest
/// capability the kernel knows, set before any thread is signalled: the signal handler
/// reads only these.
static KEPT_WORDS: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];
static LAST_CAP: AtomicU32 = AtomicU32::new(0);
/// The capability the running agent keeps beside [`KEPT`] where the kernel asks it of
/// every `bpf()` call.
pub const KEPT_FOR_BPF_CALLS: Capability = Capability::CAP_BPF;

/// Whether this kernel refuses `bpf()` calls to a thread without CAP_BPF (and
/// CAP_SYS_ADMIN), measured rather than guessed from the version (distributions backport):
/// `call`, a harmless `bpf()` call on a descriptor the agent holds, runs with those two
/// capabilities out of the calling thread's effective set (raised again from its
/// permitted set afterwards; capabilities are per thread, so no other thread is touched)
/// and fails with EPERM only on such a kernel. No thread is made for it: one that is still
/// ending when the drop lists the threads would never run the drop's handler.
pub fn bpf_calls_need_cap_bpf(call: impl FnOnce() -> std::io::Result<()>) -> bool {
    const LOWERED: [Capability; 2] = [Capability::CAP_BPF, Capability::CAP_SYS_ADMIN];
    let Ok(effective) = caps::read(None, CapSet::Effective) else {
        return true;
    };
    let lowered: Vec<Capability> = LOWERED
        .into_iter()
        .filter(|cap| effective.contains(cap))
        .collect();
    for cap in &lowered {
        if caps::drop(None, CapSet::Effective, *cap).is_err() {
            // Cannot measure: keep CAP_BPF, which costs nothing where it is not needed.
            restore(&lowered);
            return true;
        }
    }
    let refused = matches!(call(), Err(e) if e.raw_os_error() == Some(libc::EPERM));
    restore(&lowered);
    refused
}

/// Raises `caps` again into the calling thread's effective set (from its permitted set,
/// which lowering them there left alone).
fn restore(caps: &[Capability]) {
    for cap in caps {
        if let Err(e) = caps::raise(None, CapSet::Effective, *cap) {
            log::warn!("raising {cap} again after the bpf() probe: {e}");
        }
    }
}

/// Whether the bounding set can be lowered (CAP_SETPCAP in effect: root). Without it (a
/// service user with ambient capabilities), the bounding set is what the service manager
/// gave, and `no_new_privs` keeps an exec from gaining anything anyway.
static DROP_BOUNDING: AtomicBool = AtomicBool::new(false);
/// Threads whose handler failed.
static FAILED: AtomicUsize = AtomicUsize::new(0);
/// The ids of the threads that ran the handler (the first [`MAX_RECORDED`]; past them a
/// thread is waited for until it has dropped, read from its status).
const MAX_RECORDED: usize = 4096;
static HANDLED: [AtomicI32; MAX_RECORDED] = [const { AtomicI32::new(0) }; MAX_RECORDED];
static HANDLED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Whether thread `tid` ran the handler.
fn handled(tid: i32) -> bool {
    let count = HANDLED_COUNT.load(Ordering::SeqCst).min(MAX_RECORDED);
    HANDLED[..count]
        .iter()
        .any(|t| t.load(Ordering::SeqCst) == tid)
}

/// Whether thread `tid` is still there and not ending (a zombie or dead task never runs a
/// handler again).
fn still_running(tid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) {
        // `tid (comm) S ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X" | "x")),
        Err(_) => false,
    }
}

/// How long the other threads get to run their handler.
/// Generous: a thread runs its handler when it next enters or leaves the kernel, and a
/// thread in an uninterruptible wait (a page fault served from a slow disk) may take
/// seconds; 5 s was once too little under emulation.
const HANDLER_WAIT: Duration = Duration::from_secs(30);

/// What [`drop_to_kept`] did.
#[derive(Debug)]
pub struct Dropped {
    /// The capabilities kept.
    pub kept: Vec<Capability>,
    /// Threads of the process, the calling one included.
    pub threads: usize,
    /// Whether the bounding set was lowered too.
    pub bounding: bool,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "capabilities: kept {} (effective and permitted), dropped the rest{} in all {} thread(s); no_new_privs set",
            names(&self.kept),
            if self.bounding {
                " (bounding set too)"
            } else {
                ""
            },
            self.threads
        )
    }
}

/// Drops every capability but `kept` ([`KEPT`], with [`KEPT_FOR_BPF_CALLS`] where the
/// kernel needs it) from the effective, permitted, inheritable and ambient sets (and, with
/// CAP_SETPCAP, the bounding set), and sets `no_new_privs`, in every thread of the process
/// (see the module docs). An error says which thread kept what.
pub fn drop_to_kept(kept: &[Capability]) -> Result<Dropped, PrivilegeError> {
    let (low, high) = words(kept);
    KEPT_WORDS[0].store(low, Ordering::SeqCst);
    KEPT_WORDS[1].store(high, Ordering::SeqCst);
    LAST_CAP.store(
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40),
        Ordering::SeqCst,
    );
    let bounding = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(PrivilegeError::Read)?;
    DROP_BOUNDING.store(bounding, Ordering::SeqCst);

    let signal = libc::SIGRTMIN() + 4;
    install_handler(signal)?;
    // SAFETY: plain system calls on the calling thread, with the statics set above.
    if unsafe { drop_this_thread() } != 0 {
        return Err(PrivilegeError::Drop(format!(
            "in the main thread: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: getpid/gettid have no preconditions.
    let (pid, own) = unsafe { (libc::getpid(), libc::gettid()) };
    let mut signalled: HashSet<i32> = HashSet::from([own]);
    loop {
        let new: Vec<i32> = threads()?
            .into_iter()
            .filter(|t| !signalled.contains(t))
            .collect();
        if new.is_empty() {
            break;
        }
        let mut waiting = Vec::new();
        for tid in new {
            signalled.insert(tid);
            // SAFETY: a signal to a thread of this process, whose handler is installed.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) } == 0 {
                waiting.push(tid);
            }
            // ESRCH: the thread ended meanwhile.
        }
        // Until each has run the handler, or ended: a thread that was exiting when it was
        // listed takes the signal (tgkill succeeds) but never runs a handler again.
        let deadline = Instant::now() + HANDLER_WAIT;
        loop {
            waiting.retain(|tid| !handled(*tid) && still_running(*tid));
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(PrivilegeError::Drop(format!(
                    "thread(s) {waiting:?} did not run the handler within {HANDLER_WAIT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if FAILED.load(Ordering::SeqCst) > 0 {
        return Err(PrivilegeError::Drop(format!(
            "{} thread(s) failed",
            FAILED.load(Ordering::SeqCst)
        )));
    }
    let threads = verify(low, high)?;
    Ok(Dropped {
        kept: kept.to_vec(),
        threads,
        bounding,
    })
}

/// The two capset words of `caps`.
fn words(caps: &[Capability]) -> (u32, u32) {
    let mask = caps.iter().fold(0u64, |m, c| m | c.bitmask());
    (mask as u32, (mask >> 32) as u32)
}

fn install_handler(signal: libc::c_int) -> Result<(), PrivilegeError> {
    extern "C" fn on_signal(_: libc::c_int) {
        // SAFETY: only system calls and atomics: async-signal-safe.
        if unsafe { drop_this_thread() } != 0 {
            FAILED.fetch_add(1, Ordering::SeqCst);
        }
        let slot = HANDLED_COUNT.fetch_add(1, Ordering::SeqCst);
        if let Some(record) = HANDLED.get(slot) {
            // SAFETY: gettid has no preconditions.
            record.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        }
    }
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut())
    };
    if installed != 0 {
        return Err(PrivilegeError::Drop(format!(
            "installing the signal handler: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The calling thread's drop, in the order the kernel allows it: the bounding set while
/// CAP_SETPCAP is still in effect, the ambient set, then `capset` (effective, permitted
/// and inheritable to the kept set), then `no_new_privs`. System calls only (run from the
/// signal handler). Returns 0, or -1 with errno set.
unsafe fn drop_this_thread() -> libc::c_int {
    let low = KEPT_WORDS[0].load(Ordering::SeqCst);
    let high = KEPT_WORDS[1].load(Ordering::SeqCst);
    // SAFETY: prctl and capset with valid arguments (the caller's contract).
    unsafe {
        if DROP_BOUNDING.load(Ordering::SeqCst) {
            for cap in 0..=LAST_CAP.load(Ordering::SeqCst) {
                let kept = if cap < 32 {
                    low & (1 << cap)
                } else {
                    high & (1 << (cap - 32))
                };
                if kept == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0
                {
                    return -1;
                }
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return -1;
        }
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: low,
                permitted: low,
                inheritable: 0,
            },
            CapData {
                effective: high,
                permitted: high,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return -1;
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0)
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The process's threads.
fn threads() -> Result<Vec<i32>, PrivilegeError> {
    let dir = std::fs::read_dir("/proc/self/task")
        .map_err(|e| PrivilegeError::Drop(format!("listing /proc/self/task: {e}")))?;
    Ok(dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// Checks each thread's `CapEff`, `CapPrm` and `CapAmb` against the kept set; returns how
/// many threads there are.
fn verify(low: u32, high: u32) -> Result<usize, PrivilegeError> {
    let kept = (u64::from(high) << 32) | u64::from(low);
    let tids = threads()?;
    for tid in &tids {
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue; // ended meanwhile
        };
        for (field, value) in status_caps(&status) {
            if value & !kept != 0 {
                return Err(PrivilegeError::Drop(format!(
                    "thread {tid} still has {field} {value:016x}"
                )));
            }
        }
    }
    Ok(tids.len())
}

/// The `CapEff`, `CapPrm` and `CapAmb` masks of a `/proc/.../status` text.
pub fn status_caps(status: &str) -> Vec<(&str, u64)> {
    status
        .lines()
        .filter_map(|line| {
            let (field, value) = line.split_once(':')?;
            matches!(field, "CapEff" | "CapPrm" | "CapAmb")
                .then(|| Some((field, u64::from_str_radix(value.trim(), 16).ok()?)))
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_words_hold_exactly_the_kept_bits() {
        let (low, high) = words(&KEPT);
        // CAP_NET_BIND_SERVICE 10, CAP_NET_ADMIN 12.
        assert_eq!(low, (1 << 10) | (1 << 12));
        assert_eq!(high, 0);
    }

    #[test]
    fn status_masks_are_read() {
        let status = "Name:\tproxy\nCapInh:\t0000000000000000\nCapPrm:\t0000008000001400\n\
                      CapEff:\t0000008000001400\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        assert_eq!(
            status_caps(status),
            vec![
                ("CapPrm", 0x80_0000_1400),
                ("CapEff", 0x80_0000_1400),
                ("CapAmb", 0)
            ]
        );
    }

    #[test]
    fn missing_capabilities_are_named() {
        let e = PrivilegeError::Missing(vec![Capability::CAP_BPF]);
        let text = e.to_string();
        assert!(text.starts_with("missing capabilities cap_bpf:"), "{text}");
        assert!(text.contains("cap_bpf,cap_net_admin,cap_perfmon"), "{text}");
    }
}
