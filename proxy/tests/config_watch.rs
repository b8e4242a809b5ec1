//! Kernel tests of the watched rules file (issue 25): a changed `--config` file applies
//! without a signal, however it changed (the kubelet's symlink swap, an editor's rename, a
//! write in place); a broken one is refused and counted while the rules in force serve on;
//! `proxy stats` says which rules run (their hash) and how the reloads went.

mod common;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Agent, Server, ServerMode, TempDir, require_root, server};
use proxy_testbed::{CLIENT_V4, Gateway, ROUTER_SERVER_SIDE_V4, exchange};

const PORT_80: &str = "[defaults]\non_port = 50080\n\n[[rule]]\ndport = \"80\"\n";
const PORTS_80_8080: &str = "[defaults]\non_port = 50080\n\n[[rule]]\ndport = \"80,8080\"\n";

/// Whether a connection to the server's `port` went through the proxy (the server saw the
/// router's address) or straight to it (the client's); None if it failed.
fn proxied(gw: &Gateway, port: u16) -> Option<bool> {
    let reply = gw
        .client
        .run(move || exchange(server(port), b"x"))
        .expect("netns")
        .ok()?;
    if reply.starts_with(&format!("peer={ROUTER_SERVER_SIDE_V4}:")) {
        Some(true)
    } else if reply.starts_with(&format!("peer={CLIENT_V4}:")) {
        Some(false)
    } else {
        None
    }
}

/// Polls until port 8080 is proxied; how long it took.
fn until_proxied(gw: &Gateway, port: u16, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if proxied(gw, port) == Some(true) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// `proxy stats` of the router's agent.
fn stats(gw: &Gateway) -> String {
    let out = gw
        .router
        .command(env!("CARGO_BIN_EXE_proxy"))
        .arg("stats")
        .output()
        .expect("proxy stats");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rules hash `proxy stats` reports.
fn rules_hash(gw: &Gateway) -> String {
    let text = stats(gw);
    text.split("rules: hash ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no rules hash in:\n{text}"))
        .to_owned()
}

/// Connections to port 80 every 10 ms until stopped: how many were not proxied or failed.
struct Load {
    stop: Arc<AtomicBool>,
    bad: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Result<(), proxy_testbed::TestbedError>>>,
}

impl Load {
    fn start(gw: &Gateway) -> Load {
        let (stop, bad, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let thread = {
            let (stop, bad, done) = (Arc::clone(&stop), Arc::clone(&bad), Arc::clone(&done));
            gw.client.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match exchange(server(80), b"load") {
                        Ok(reply)
                            if reply.starts_with(&format!("peer={ROUTER_SERVER_SIDE_V4}:")) => {}
                        _ => {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Load {
            stop,
            bad,
            done,
            thread: Some(thread),
        }
    }

    /// (connections made, not proxied or failed)
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.done.load(Ordering::Relaxed),
            self.bad.load(Ordering::Relaxed),
        )
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The kubelet's update of a mounted ConfigMap, emulated: the file is a symlink through
/// `..data`, itself a symlink to a timestamped directory; the update writes a new one,
/// renames a new `..data` over the old and removes the old directory. Under load, the new
/// rules apply within 2 s, and no connection fails or goes past the proxy meanwhile.
#[test]
fn the_kubelets_symlink_swap_applies_the_new_rules_within_two_seconds() {
    require_root();
    let gw = Gateway::new("cfgkube").expect("topology");
    let _s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let _s8080 = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let dir = TempDir::new("proxy-cfgkube");
    let old = dir.join("..2026_12_06_00_00_00.1");
    std::fs::create_dir(&old).expect("dir");
    write(&old.join("rules.toml"), PORT_80);
    std::os::unix::fs::symlink("..2026_12_06_00_00_00.1", dir.join("..data")).expect("..data");
    std::os::unix::fs::symlink("..data/rules.toml", dir.join("rules.toml")).expect("rules.toml");
    let config = dir.join("rules.toml");
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        proxied(&gw, 8080),
        Some(false),
        "port 8080 is not in the first rules"
    );
    let hash_before = rules_hash(&gw);
    let load = Load::start(&gw);
    std::thread::sleep(Duration::from_millis(300));

    // The kubelet's steps (atomic_writer.go): the new data, a temporary symlink to it,
    // renamed over ..data, then the old directory removed.
    let new = dir.join("..2026_12_06_00_01_00.2");
    std::fs::create_dir(&new).expect("dir");
    write(&new.join("rules.toml"), PORTS_80_8080);
    std::os::unix::fs::symlink("..2026_12_06_00_01_00.2", dir.join("..data_tmp")).expect("tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("the swap");
    std::fs::remove_dir_all(&old).expect("removing the old data");

    let took = until_proxied(&gw, 8080, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let (made, bad) = load.finish();
    let log = agent.log_text();
    let took = took.unwrap_or_else(|| panic!("port 8080 was never proxied:\n{log}"));
    println!("the new rules applied after {took:?}; {made} connections, {bad} bad");
    assert!(took < Duration::from_secs(2), "{took:?}\n{log}");
    assert_eq!(
        bad, 0,
        "{bad} of {made} connections failed or went past the proxy"
    );
    assert!(made > 20, "too little load: {made}");
    assert_eq!(log.matches("reload applied").count(), 1, "{log}");
    assert_ne!(rules_hash(&gw), hash_before);
    assert!(
        stats(&gw).contains("reloads: 1 applied, 0 refused"),
        "{}",
        stats(&gw)
    );
    agent.stop_ok();
}

/// An editor's save (a temporary file renamed over the rules file) and a write in place
/// each apply once. A change of comments only reloads, and the rules hash stays: it
/// changes exactly when the rules in force do.
#[test]
fn an_editors_rename_and_a_write_in_place_each_apply_once() {
    require_root();
    let gw = Gateway::new("cfgedit").expect("topology");
    let _s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let _s8080 = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let dir = TempDir::new("proxy-cfgedit");
    let config = dir.join("rules.toml");
    write(&config, PORT_80);
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    let applied = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent.log_text().matches("reload applied").count() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Nothing more comes of the same change.
        std::thread::sleep(Duration::from_millis(1500));
        agent.log_text().matches("reload applied").count()
    };
    let first = rules_hash(&gw);

    // The editor: a swap file written, then renamed over the original.
    write(&dir.join(".rules.toml.swp"), PORTS_80_8080);
    std::fs::rename(dir.join(".rules.toml.swp"), &config).expect("rename");
    assert_eq!(applied(1), 1, "{}", agent.log_text());
    assert_eq!(proxied(&gw, 8080), Some(true));
    let second = rules_hash(&gw);
    assert_ne!(second, first);

    // In place, with only a comment more: reloaded once, same rules, same hash.
    write(&config, &format!("# reviewed\n{PORTS_80_8080}"));
    assert_eq!(applied(2), 2, "{}", agent.log_text());
    assert_eq!(rules_hash(&gw), second, "a comment changed the rules hash");

    // A neighbour file changing reloads nothing.
    write(&dir.join("notes.txt"), "unrelated");
    assert_eq!(applied(2), 2, "{}", agent.log_text());

    // In place, back to port 80 alone.
    write(&config, PORT_80);
    assert_eq!(applied(3), 3, "{}", agent.log_text());
    assert_eq!(rules_hash(&gw), first);
    assert_eq!(proxied(&gw, 8080), Some(false));
    agent.stop_ok();
}

/// A broken file is refused with one log line and counted; the rules in force serve on;
/// the next good file applies.
#[test]
fn a_broken_file_is_refused_and_counted_and_the_next_good_one_applies() {
    require_root();
    let gw = Gateway::new("cfgbad").expect("topology");
    let _s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let _s8080 = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let dir = TempDir::new("proxy-cfgbad");
    let config = dir.join("rules.toml");
    write(&config, PORT_80);
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    let hash = rules_hash(&gw);
    write(&config, "[[rule]]\ndport = \"eighty\"\n");
    agent
        .wait_for_line(&["reload refused"], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no refusal:\n{}", agent.log_text()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.log_text().matches("reload refused").count(), 1);
    let text = stats(&gw);
    assert!(
        text.contains("reloads: 0 applied, 1 refused; last reload: refused at"),
        "{text}"
    );
    assert_eq!(rules_hash(&gw), hash);
    assert_eq!(
        proxied(&gw, 80),
        Some(true),
        "the rules in force stopped serving"
    );

    write(&config, PORTS_80_8080);
    assert!(
        until_proxied(&gw, 8080, Duration::from_secs(5)).is_some(),
        "{}",
        agent.log_text()
    );
    let text = stats(&gw);
    assert!(
        text.contains("reloads: 1 applied, 1 refused; last reload: applied at"),
        "{text}"
    );
    agent.stop_ok();
}
