//! Kernel tests of `dist/systemd/proxy.service` under a real systemd (issue 19, part 5): a
//! Debian root (`cargo xtask systemd-root`, cached under `target/`) booted with
//! `systemd-nspawn` in the test's router namespace, between its client and server
//! namespaces, the agent built here bind-mounted at `/usr/local/bin/proxy`.
//!
//! The unit is the shipped file, bind-mounted as it is; a drop-in changes one thing, the
//! interface (`--iface eth0` becomes `--iface r0`, the router's client side), by replacing
//! `ExecStart=` with the shipped line so edited. `/etc/proxy/rules.toml` is the test's (TCP
//! port 80 and UDP port 53 to the built-in listener, neither failing open: the shipped
//! sample's DNS rule covers private ranges only, and fails open).
//!
//! What the container needs beyond nspawn's defaults, and why:
//! - `--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN`: the unit's ambient set must be in the
//!   container's bounding set (nspawn keeps `CAP_NET_BIND_SERVICE`, and gives
//!   `CAP_NET_ADMIN` only with a private network it makes itself);
//! - `--system-call-filter=bpf`: nspawn's seccomp filter refuses `bpf(2)` (EPERM: "failed to
//!   create map");
//! - a bpffs of the test's own, bind-mounted at `/sys/fs/bpf`: systemd mounts none in a
//!   container (and nspawn's /sys is read-only), and a private one keeps the pins apart from
//!   the host's and goes with the test. It is mounted mode 0700, root's, as systemd mounts it
//!   on a host, so the unit's `ExecStartPre=` lines are what lets user `proxy` reach it;
//! - `--register=no --keep-unit`: the host runs no systemd (no machined, no bus);
//! - `--volatile=overlay`: the cached root stays as built (every change goes to a tmpfs).
//!
//! The user `proxy` exists in Debian's base system (base-passwd, uid 13); the shipped
//! sysusers file is bind-mounted too, as an install would put it.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use common::{
    TempDir, ask_line,
    load::{Load, OriginServer, Tally, one_at_a_time, tally_report},
    require_root, server,
};
use proxy_testbed::{Gateway, Netns, ROUTER_SERVER_SIDE_V4};

/// The root `cargo xtask systemd-root` builds, relative to the workspace; kept equal to
/// `xtask/src/prereqs.rs`'s `SYSTEMD_ROOT`. `PROXY_SYSTEMD_ROOT` names another.
const ROOT: &str = "target/systemd-root/bookworm-1";

/// The rules: TCP port 80 (the load) and UDP port 53 (its UDP flows), neither failing
/// open, so anything past the proxy is the agent's doing, not a rule's.
const RULES: &str = r#"[defaults]
tproxy_mark = "0x1/0x1"
on_port = 50080

[[rule]]
dport = "80"
protocol = "tcp"

[[rule]]
dport = "53"
protocol = "udp"
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// The shipped unit's `ExecStart=` line with the interface replaced: the drop-in's.
fn override_conf() -> String {
    let unit = std::fs::read_to_string(workspace().join("dist/systemd/proxy.service"))
        .expect("reading dist/systemd/proxy.service");
    let exec_start = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("the unit's ExecStart= line");
    assert!(
        exec_start.contains(" --iface eth0 "),
        "the shipped ExecStart= names no --iface eth0: {exec_start}"
    );
    format!(
        "[Service]\nExecStart=\n{}\n",
        exec_start.replace(" --iface eth0 ", " --iface r0 ")
    )
}

/// A booted container: systemd as PID 1 in the router namespace `router`. Dropping it
/// powers it off (SIGTERM to nspawn, SIGKILL after 60 s), unmounts its bpffs and removes
/// its files, pass or fail.
struct Container {
    nspawn: Child,
    /// systemd's pid, seen from the host: `nsenter --target` enters its namespaces.
    leader: u32,
    machine: String,
    /// The cgroups nspawn makes for the container (`payload`, and systemd's below it, in
    /// the test's own cgroup of each hierarchy: it runs `--keep-unit`), removed once it has
    /// stopped; the ones that were there before are left alone.
    payload_cgroups: Vec<PathBuf>,
    /// Declared before `dir`, so unmounted before the directory goes.
    bpffs: Bpffs,
    dir: TempDir,
}

/// A bpffs of the test's own, mounted at a directory of the host; unmounted when dropped
/// (its pins go with it), pass or fail.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(at: PathBuf) -> Bpffs {
        std::fs::create_dir_all(&at).expect("bpffs mount point");
        let mounted = Command::new("mount")
            .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(mounted.success(), "mounting a bpffs at {}", at.display());
        Bpffs(at)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Unpinning detaches what the pins held; the router namespace goes after this.
        let _ = std::fs::remove_dir_all(self.0.join("proxy"));
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

impl Container {
    fn boot(router: &Netns, tag: &str) -> Container {
        let root = std::env::var_os("PROXY_SYSTEMD_ROOT")
            .map_or_else(|| workspace().join(ROOT), PathBuf::from);
        assert!(
            root.join("usr/lib/systemd/systemd").exists(),
            "no Debian root with systemd in {}: build it with `cargo xtask systemd-root` (`cargo \
             xtask test` does it too)",
            root.display()
        );
        let dir = TempDir::new(&format!("proxy-systemd-{tag}"));
        std::fs::write(dir.join("override.conf"), override_conf()).expect("drop-in");
        std::fs::write(dir.join("rules.toml"), RULES).expect("rules");
        let bpffs = Bpffs::mount(dir.join("bpffs"));
        let machine = format!("proxy-{tag}-{}", std::process::id());
        let dist = workspace().join("dist/systemd");
        let bind = |from: &Path, to: &str| format!("{}:{to}", from.display());
        let log = std::fs::File::create(dir.join("nspawn.log")).expect("nspawn log");
        let payload_cgroups = payload_cgroups()
            .into_iter()
            .filter(|dir| !dir.exists())
            .collect();
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(&root)
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--volatile=overlay",
                "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
                "--system-call-filter=bpf",
                "--console=passive",
            ])
            .arg(format!("--machine={machine}"))
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                router.name
            ))
            .arg(format!(
                "--bind-ro={}",
                bind(
                    Path::new(env!("CARGO_BIN_EXE_proxy")),
                    "/usr/local/bin/proxy"
                )
            ))
            .arg(format!(
                "--bind-ro={}",
                bind(
                    &dist.join("proxy.service"),
                    "/etc/systemd/system/proxy.service"
                )
            ))
            .arg(format!(
                "--bind-ro={}",
                bind(
                    &dist.join("proxy-sysusers.conf"),
                    "/usr/lib/sysusers.d/proxy.conf"
                )
            ))
            .arg(format!(
                "--bind-ro={}",
                bind(
                    &dir.join("override.conf"),
                    "/etc/systemd/system/proxy.service.d/iface.conf"
                )
            ))
            .arg(format!(
                "--bind-ro={}",
                bind(&dir.join("rules.toml"), "/etc/proxy/rules.toml")
            ))
            .arg(format!("--bind={}", bind(&bpffs.0, "/sys/fs/bpf")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (Debian's systemd-container; `cargo xtask test` installs it)");
        let mut container = Container {
            nspawn,
            leader: 0,
            machine,
            payload_cgroups,
            bpffs,
            dir,
        };
        container.leader = container.wait_leader();
        // Until systemd answers and has booted (or gave up on a unit: "degraded").
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut state = String::new();
        while Instant::now() < deadline {
            let out = container.exec(&["systemctl", "is-system-running"]);
            state = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if state == "running" || state == "degraded" {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            state == "running" || state == "degraded",
            "the container did not boot within 60 s: {state}\n{}",
            container.nspawn_log()
        );
        container
    }

    /// The container's PID 1, nspawn's child, once it runs systemd.
    fn wait_leader(&mut self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let nspawn = self.nspawn.id();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!("systemd-nspawn exited: {status}\n{}", self.nspawn_log());
            }
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
                    .unwrap_or_default();
            for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return pid;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no systemd in the container after 30 s\n{}",
            self.nspawn_log()
        );
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nspawn.log")).unwrap_or_default()
    }

    /// `args`, run in the container's namespaces (as its root, outside any unit).
    fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["--target", &self.leader.to_string(), "--all", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// `systemctl ARGS`; panics with the journal if it fails.
    fn systemctl(&self, args: &[&str]) {
        let out = self.exec(&[&["systemctl"], args].concat());
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
    }

    /// A property of proxy.service (`systemctl show -p NAME --value`).
    fn show(&self, property: &str) -> String {
        let out = self.exec(&["systemctl", "show", "-p", property, "--value", "proxy"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn main_pid(&self) -> u32 {
        self.show("MainPID").parse().expect("MainPID")
    }

    /// ActiveState/SubState.
    /// The unit's state, once it is `active/running` or after 5 s: systemd may still be
    /// taking in a notification (the new main pid after a reload) when `systemctl` returns.
    fn state(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = format!("{}/{}", self.show("ActiveState"), self.show("SubState"));
            if state == "active/running" || Instant::now() >= deadline {
                return state;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// proxy.service's journal: its processes' lines and systemd's about it.
    fn journal(&self) -> String {
        let out = self.exec(&["journalctl", "-u", "proxy", "-o", "cat", "--no-pager"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `pid` (the container's) runs, zombies excepted.
    fn alive(&self, pid: u32) -> bool {
        let out = self.exec(&["cat", &format!("/proc/{pid}/stat")]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).split(' ').nth(2) != Some("Z")
    }

    /// Waits (bounded) until `done` holds; false if it never did.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&Container) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        done(self)
    }

    /// Every file and directory under the agent's pin directory.
    fn pins(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![self.bpffs.0.join("proxy")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                found.push(entry.path().display().to_string());
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        found
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        // SIGTERM: nspawn asks systemd to power off, which stops the agent (as a SIGTERM).
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && matches!(self.nspawn.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            // The container's PID 1 first: every process of its pid namespace goes with it.
            if self.leader != 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.leader as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        // nspawn cannot remove this itself when /run is not a tmpfs ("Attempted to remove
        // disk file system ... and we can't allow that").
        let _ =
            std::fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.machine));
        for dir in &self.payload_cgroups {
            remove_cgroup_tree(dir);
        }
    }
}

/// Where nspawn (`--keep-unit`) makes the container's `payload` cgroup: in this process's
/// own cgroup of the cgroup2 hierarchy and of systemd's named one, where mounted.
fn payload_cgroups() -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own_path = |controller: &str| {
        own.lines()
            .find_map(|l| {
                l.split_once(':')
                    .and_then(|(_, rest)| rest.strip_prefix(controller))
            })
            .map(|path| {
                path.trim_start_matches(':')
                    .trim_start_matches('/')
                    .to_owned()
            })
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (dir, kind, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            let own = match *kind {
                "cgroup2" => own_path(":")?,
                "cgroup" if options.split(',').any(|o| o == "name=systemd") => {
                    own_path("name=systemd")?
                }
                _ => return None,
            };
            Some(Path::new(dir).join(own).join("payload"))
        })
        .collect()
}

/// Removes a cgroup and its children, deepest first (a cgroup goes with `rmdir` once it
/// has no process and no child).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// One connection from the client namespace: the server's answer names the address it saw
/// (the router's when proxied).
fn ask_origin(gw: &Gateway) -> String {
    gw.client
        .run(|| ask_line(server(80), "short"))
        .expect("the client namespace")
        .unwrap_or_else(|e| panic!("a connection from the client: {e}"))
}

fn assert_proxied(gw: &Gateway, container: &Container, when: &str) {
    let answer = ask_origin(gw);
    assert_eq!(
        answer,
        format!("from={ROUTER_SERVER_SIDE_V4}"),
        "{when}: not proxied\n{}",
        container.journal()
    );
}

/// The status lines of the container's process `pid` that say who it is and what it may.
fn privileges(container: &Container, pid: u32) -> Vec<String> {
    let out = container.exec(&["cat", &format!("/proc/{pid}/status")]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            [
                "Uid:",
                "CapInh:",
                "CapPrm:",
                "CapEff:",
                "CapAmb:",
                "NoNewPrivs:",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// `systemctl stop`, then `proxy cleanup`: the stop leaves the classifier, rules and pins for
/// a next agent; the cleanup removes them all.
fn stop_then_cleanup(gw: &Gateway, container: &Container) {
    let pid = container.main_pid();
    container.systemctl(&["stop", "proxy"]);
    assert_eq!(container.state(), "inactive/dead");
    assert!(!container.alive(pid), "the agent {pid} runs after the stop");
    let journal = container.journal();
    assert!(journal.contains("stopping to be replaced"), "{journal}");
    let rules = common::ip_stdout(&gw.router, &["rule"]);
    assert!(
        rules.contains("proto 211"),
        "the stop (to be replaced) removed the rules:\n{rules}"
    );
    assert!(!container.pins().is_empty(), "the stop removed the pins");
    let out = container.exec(&["/usr/local/bin/proxy", "cleanup", "--table", "100"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("proxy cleanup: {said}");
    assert!(out.status.success(), "proxy cleanup: {said}");
    for family in ["-4", "-6"] {
        let rules = common::ip_stdout(&gw.router, &[family, "rule"]);
        assert!(
            !rules.contains("proto 211"),
            "the cleanup left {family} rules:\n{rules}"
        );
        let routes = common::ip_stdout(&gw.router, &[family, "route", "show", "table", "100"]);
        assert!(
            routes.trim().is_empty(),
            "the cleanup left {family} routes:\n{routes}"
        );
    }
    let pins = container.pins();
    assert!(pins.is_empty(), "the cleanup left pins: {pins:?}");
}

/// New connections only, from [`NewConnections::LOOPS`] loops at once (each 200/s when
/// nothing stalls it): a loop whose SYN was dropped waits a second to resend it, and the
/// moment between a classifier's removal and the next agent's is shorter than that under
/// systemd, so one loop could sleep through it; several at once do not.
struct NewConnections(Vec<Load>);

impl NewConnections {
    const LOOPS: usize = 4;

    fn start(client: &Netns) -> NewConnections {
        NewConnections(
            (0..Self::LOOPS)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(2));
                    Load::start(client, 0, 0)
                })
                .collect(),
        )
    }

    /// The loops' tallies, added up.
    fn finish(self) -> Tally {
        let mut sum = Tally::default();
        for tally in self.0.into_iter().map(Load::finish) {
            sum.new_ok += tally.new_ok;
            sum.new_direct += tally.new_direct;
            sum.new_failed.extend(tally.new_failed);
            sum.new_slow.extend(tally.new_slow);
        }
        sum
    }
}

fn assert_nothing_lost(tally: &Tally, origin: &OriginServer, report: &str) {
    assert!(tally.new_failed.is_empty(), "{report}");
    assert_eq!(tally.new_direct, 0, "{report}");
    assert_eq!(origin.direct.load(Ordering::Relaxed), 0, "{report}");
    assert!(tally.new_slow.is_empty(), "{report}");
    assert!(tally.long_failed.is_empty(), "{report}");
    assert_eq!(tally.long_ok, 100, "{report}");
    assert!(tally.udp_failed.is_empty(), "{report}");
    assert_eq!(tally.udp_ok, 20, "{report}");
    assert!(tally.udp_lost_at_most_one_percent(), "{report}");
    assert!(tally.new_ok > 1000, "too little load: {report}");
}

/// The shipped unit under systemd: `systemctl start` serves, with the capabilities the
/// agent keeps after setup; ten `systemctl reload`s (in-place upgrades) in a row under load
/// lose nothing, and after each systemd tracks the new agent as the service's main process;
/// a `kill -9` of that agent (not systemd's child: `proxy upgrade` started it) is noticed and
/// `Restart=always` takes over with nothing past the proxy; `systemctl stop` then `proxy
/// cleanup` leave nothing behind.
#[test]
fn the_shipped_unit_upgrades_in_place_under_load_and_restarts_after_a_kill() {
    require_root();
    let _one = one_at_a_time();
    let gw = Gateway::new("sdreload").expect("topology");
    let origin = OriginServer::start(&gw.server, server(80));
    let booted = Instant::now();
    let container = Container::boot(&gw.router, "reload");
    println!(
        "container booted in {:.1} s",
        booted.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    container.systemctl(&["start", "proxy"]);
    println!("systemctl start: {:.2} s", started.elapsed().as_secs_f64());
    assert_eq!(container.state(), "active/running");
    let first = container.main_pid();
    assert_proxied(&gw, &container, "after systemctl start");
    let journal = container.journal();
    let kept = journal
        .lines()
        .find(|l| l.contains("capabilities: kept"))
        .unwrap_or_else(|| panic!("no capabilities line:\n{journal}"));
    println!("{}", kept.trim());
    assert!(
        kept.contains(
            "capabilities: kept cap_net_admin,cap_net_bind_service (effective and permitted)"
        ),
        "{kept}"
    );
    assert!(kept.contains("no_new_privs set"), "{kept}");
    let status = privileges(&container, first);
    println!("agent {first}: {status:?}");
    let uid = container.exec(&["id", "-u", "proxy"]);
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    assert!(
        status.contains(&format!("Uid: {uid} {uid} {uid} {uid}")),
        "not user proxy ({uid}): {status:?}"
    );
    // CAP_NET_BIND_SERVICE (10) and CAP_NET_ADMIN (12).
    for set in ["CapPrm", "CapEff"] {
        assert!(
            status.contains(&format!("{set}: 0000000000001400")),
            "{status:?}"
        );
    }
    assert!(status.contains(&"NoNewPrivs: 1".to_owned()), "{status:?}");

    let load = Load::start_with_udp(&gw.client, 50, 50, 20);
    std::thread::sleep(Duration::from_secs(1));
    let mut serving = first;
    let mut took = Vec::new();
    for round in 0..10 {
        let reloading = Instant::now();
        container.systemctl(&["reload", "proxy"]);
        took.push(reloading.elapsed());
        let new = container.main_pid();
        assert_ne!(
            new,
            serving,
            "round {round}: MainPID did not change\n{}",
            container.journal()
        );
        assert_eq!(container.state(), "active/running", "round {round}");
        // The journal is not read here: under the load the agent logs 200 lines a second,
        // more than journald's rate limit keeps. The process is.
        let cmdline = container.exec(&["cat", &format!("/proc/{new}/cmdline")]);
        assert!(
            String::from_utf8_lossy(&cmdline.stdout)
                .starts_with("/usr/local/bin/proxy\0run\0--iface\0r0\0"),
            "round {round}: MainPID {new} is not an agent: {:?}",
            String::from_utf8_lossy(&cmdline.stdout)
        );
        assert!(
            container.wait_until(Duration::from_secs(5), |c| !c.alive(serving)),
            "round {round}: the old agent {serving} still runs"
        );
        serving = new;
        std::thread::sleep(Duration::from_millis(700));
    }
    let tally = load.finish();
    let report = tally_report(&tally);
    println!(
        "10 x systemctl reload, each {:?}: {report}",
        took.iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    let all = container.exec(&["journalctl", "-o", "cat", "--no-pager"]);
    for line in String::from_utf8_lossy(&all.stdout)
        .lines()
        .filter(|l| l.contains("Suppressed"))
    {
        println!("journald: {line}");
    }
    assert_nothing_lost(&tally, &origin, &report);
    let status = privileges(&container, serving);
    assert!(
        status.contains(&"CapEff: 0000000000001400".to_owned()),
        "the last upgraded agent: {status:?}"
    );

    // kill -9 of the agent systemd tracks but did not start: it must notice (the orphan is
    // its child now, as PID 1) and start the next, which takes the pinned classifier over.
    let restarts: u32 = container.show("NRestarts").parse().expect("NRestarts");
    let load = NewConnections::start(&gw.client);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    // The shell's kill: the minimal root has no procps.
    let out = container.exec(&["sh", "-c", "kill -9 \"$1\"", "sh", &serving.to_string()]);
    assert!(
        out.status.success(),
        "kill -9 {serving}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restarted = container.wait_until(Duration::from_secs(15), |c| {
        let pid = c.main_pid();
        pid != 0 && pid != serving && c.state() == "active/running"
    });
    let after = killed.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let tally = load.finish();
    let report = tally_report(&tally);
    println!(
        "kill -9 of {serving}: active again after {:.2} s; {report}",
        after.as_secs_f64()
    );
    assert!(
        restarted,
        "no restart after kill -9\n{}",
        container.journal()
    );
    let restarts_now: u32 = container.show("NRestarts").parse().expect("NRestarts");
    assert_eq!(restarts_now, restarts + 1);
    assert_eq!(tally.new_direct, 0, "{report}");
    assert_eq!(origin.direct.load(Ordering::Relaxed), 0, "{report}");
    assert!(tally.new_ok > 100, "{report}");
    let journal = container.journal();
    assert!(
        journal.contains("tcx link a previous run left, program replaced"),
        "the restarted agent did not take the classifier over:\n{journal}"
    );
    assert_proxied(&gw, &container, "after the restart");

    stop_then_cleanup(&gw, &container);
}

/// `systemctl kill -s HUP` re-reads the rules in place; `systemctl restart` (a SIGTERM, then
/// a start) lets no connection past the proxy: the stopped agent leaves its classifier for
/// the next one. Then `systemctl stop` and `proxy cleanup` leave nothing behind.
#[test]
fn the_shipped_unit_reloads_its_rules_and_restarts_with_nothing_past_the_proxy() {
    require_root();
    let _one = one_at_a_time();
    let gw = Gateway::new("sdrestart").expect("topology");
    let origin = OriginServer::start(&gw.server, server(80));
    let container = Container::boot(&gw.router, "restart");
    container.systemctl(&["start", "proxy"]);
    assert_eq!(container.state(), "active/running");
    let first = container.main_pid();
    assert_proxied(&gw, &container, "after systemctl start");

    let load = NewConnections::start(&gw.client);
    std::thread::sleep(Duration::from_millis(500));
    // Written in place: the container sees the bind-mounted file's new content.
    std::fs::write(
        container.dir.join("rules.toml"),
        format!("{RULES}\n[[rule]]\ndport = \"8080\"\nprotocol = \"tcp\"\n"),
    )
    .expect("rules");
    container.systemctl(&["kill", "-s", "HUP", "proxy"]);
    assert!(
        container.wait_until(Duration::from_secs(10), |c| c
            .journal()
            .contains("reloaded: 3 rule(s) in force")),
        "no config reload:\n{}",
        container.journal()
    );
    assert_eq!(container.main_pid(), first, "SIGHUP replaced the agent");

    let restarting = Instant::now();
    container.systemctl(&["restart", "proxy"]);
    let took = restarting.elapsed();
    assert_eq!(container.state(), "active/running");
    let next = container.main_pid();
    assert_ne!(next, first);
    std::thread::sleep(Duration::from_secs(2));
    let tally = load.finish();
    let report = tally_report(&tally);
    println!("systemctl restart: {:.2} s; {report}", took.as_secs_f64());
    assert_eq!(tally.new_direct, 0, "{report}");
    assert_eq!(origin.direct.load(Ordering::Relaxed), 0, "{report}");
    assert!(tally.new_ok > 300, "{report}");
    let journal = container.journal();
    assert!(journal.contains("stopping to be replaced"), "{journal}");
    assert!(
        journal.contains("left in place for the next agent"),
        "{journal}"
    );
    assert!(
        journal.contains("tcx link a previous run left, program replaced"),
        "the next agent did not take the classifier over:\n{journal}"
    );
    assert_proxied(&gw, &container, "after the restart");

    stop_then_cleanup(&gw, &container);
}
