//! Upgrade under load: what one upgrade of the proxy costs the traffic going through it,
//! for this project's agent (a new agent started beside the running one takes its
//! listeners and live connections over, `docs/handover.md`) and for HAProxy (its seamless
//! reload: master-worker mode, SIGUSR2, the listeners passed to the new worker through a
//! stats socket with `expose-fd listeners`; the old worker keeps its connections until they
//! end).
//!
//! The load during a series of upgrades, from the client namespace: new connections at
//! 200/s, one after the other, each asking the server which address it came from (the
//! client's own means it went past the proxy); long-lived connections exchanging a request
//! and its response every 100 ms. Per upgrade: new connections failed, slower than 200 ms
//! to connect (a SYN resent), past the proxy; long-lived connections cut.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_testbed::CLIENT_V4;

use crate::{
    load::{self, REQUEST, RESPONSE},
    setup::Scenario,
    stopped,
};

/// Long-lived connections held through the upgrades.
pub const LONG_LIVED: usize = 20;
/// New connections a second.
const RATE: u32 = 200;
/// Slower than this to connect means a SYN was resent.
const SLOW: Duration = Duration::from_millis(200);
/// Time between upgrades, and before the first.
const SPACING: Duration = Duration::from_secs(2);

/// What a series of upgrades cost.
#[derive(Debug, Default, Clone)]
pub struct UpgradeSample {
    pub upgrades: usize,
    pub new_ok: usize,
    pub new_failed: usize,
    pub new_slow: usize,
    pub new_direct: usize,
    pub long: usize,
    pub long_cut: usize,
    /// The slowest connect, milliseconds.
    pub max_connect_ms: f64,
    /// How long each old process took to exit after its successor was ready (the agent's;
    /// HAProxy's old worker stays until its connections end).
    pub old_exit_ms: Vec<f64>,
    /// What went wrong, the first few.
    pub errors: Vec<String>,
}

/// The load, running until dropped or finished.
struct Load {
    stop: Arc<AtomicBool>,
    sample: Arc<Mutex<UpgradeSample>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(client_ns: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sample = Arc::new(Mutex::new(UpgradeSample::default()));
        let mut threads = Vec::new();
        let spawn = |f: fn(&AtomicBool, &Mutex<UpgradeSample>)| {
            let (stop, sample, ns) = (Arc::clone(&stop), Arc::clone(&sample), client_ns.to_owned());
            std::thread::spawn(move || {
                if let Err(e) = load::enter_ns(&ns) {
                    lock(&sample).errors.push(format!("entering {ns}: {e}"));
                    return;
                }
                f(&stop, &sample);
            })
        };
        threads.push(spawn(new_connections));
        for _ in 0..LONG_LIVED {
            threads.push(spawn(long_lived));
        }
        Load {
            stop,
            sample,
            threads,
        }
    }

    fn finish(mut self) -> UpgradeSample {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        lock(&self.sample).clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(sample: &Mutex<UpgradeSample>) -> std::sync::MutexGuard<'_, UpgradeSample> {
    sample
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn note(sample: &mut UpgradeSample, error: String) {
    if sample.errors.len() < 5 {
        sample.errors.push(error);
    }
}

/// Bounded: stops when told, when the bench stops, or after this long.
const LOAD_BOUND: Duration = Duration::from_secs(120);

fn new_connections(stop: &AtomicBool, sample: &Mutex<UpgradeSample>) {
    let started = Instant::now();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && !stopped() && started.elapsed() < LOAD_BOUND {
        next += Duration::from_secs(1) / RATE;
        let t0 = Instant::now();
        let result = (|| -> std::io::Result<(String, Duration)> {
            let mut stream =
                TcpStream::connect_timeout(&load::server_addr(), Duration::from_secs(3))?;
            let connected = t0.elapsed();
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            stream.write_all(b"P")?;
            let mut peer = String::new();
            stream.read_to_string(&mut peer)?;
            Ok((peer, connected))
        })();
        let mut s = lock(sample);
        match result {
            Ok((peer, connected)) => {
                s.max_connect_ms = s.max_connect_ms.max(connected.as_secs_f64() * 1e3);
                if connected > SLOW {
                    s.new_slow += 1;
                }
                if peer == CLIENT_V4.to_string() {
                    s.new_direct += 1;
                } else {
                    s.new_ok += 1;
                }
            }
            Err(e) => {
                s.new_failed += 1;
                note(&mut s, format!("new connection: {e}"));
            }
        }
        drop(s);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

fn long_lived(stop: &AtomicBool, sample: &Mutex<UpgradeSample>) {
    let started = Instant::now();
    let result = (|| -> std::io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&load::server_addr(), Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"R")?;
        let (request, mut response) = ([7u8; REQUEST], [0u8; RESPONSE]);
        while !stop.load(Ordering::Relaxed) && !stopped() && started.elapsed() < LOAD_BOUND {
            stream.write_all(&request)?;
            stream.read_exact(&mut response)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })();
    let mut s = lock(sample);
    s.long += 1;
    if let Err(e) = result {
        s.long_cut += 1;
        note(&mut s, format!("long-lived connection: {e}"));
    }
}

/// `upgrades` upgrades of `scenario`'s proxy, [`SPACING`] apart, under the load.
pub fn measure(scenario: &mut Scenario, upgrades: usize) -> Result<UpgradeSample, String> {
    scenario.prepare_upgrades()?;
    let load = Load::start(&scenario.gw.client.name);
    std::thread::sleep(SPACING);
    let mut exits = Vec::new();
    for _ in 0..upgrades {
        if stopped() {
            break;
        }
        exits.extend(scenario.upgrade_proxy()?);
        std::thread::sleep(SPACING);
    }
    let mut sample = load.finish();
    sample.upgrades = upgrades;
    sample.old_exit_ms = exits.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    // Back to the set-up the other figures measure.
    scenario.restart_proxy()?;
    Ok(sample)
}
