//! `--metrics` and `--access-log json`, against the agent in the testbed gateway: what a
//! scrape from inside the router namespace shows after proxied connections and across a
//! reload, the JSON records of a connection and a UDP session, and a port in use. Real
//! kernel, namespaces of their own, removed on drop.

mod common;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use common::{Agent, Server, ServerMode, exchange_from_client, require_root, server};
use nix::{sys::signal, unistd::Pid};
use proxy_testbed::{Gateway, Netns};

const METRICS: &str = "127.0.0.1:9464";

/// One sample: its name, its labels, its value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// A scrape, checked strictly against the text format (OpenMetrics, as Prometheus reads
/// it): every line a `# HELP`, `# TYPE` or `# UNIT` line, a sample, or the final `# EOF`;
/// every sample's name one of a `# TYPE`d family's (with the suffixes its type allows),
/// its labels well formed, its value a number.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let fail = |line: &str, why: &str| -> ! { panic!("{why}: `{line}`\nin\n{text}") };
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"# EOF"), "no final # EOF:\n{text}");
        for line in &lines[..lines.len() - 1] {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("TYPE"), Some(family), Some(kind)) => {
                        if !["counter", "gauge", "histogram", "info"].contains(&kind) {
                            fail(line, "unknown type");
                        }
                        if types.insert(family.to_owned(), kind.to_owned()).is_some() {
                            fail(line, "family typed twice");
                        }
                    }
                    (Some("HELP" | "UNIT"), Some(_), Some(_)) => {}
                    _ => fail(line, "bad comment line"),
                }
                continue;
            }
            let (name_labels, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| fail(line, "no value"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| fail(line, "bad value")),
            };
            let (name, labels) = match name_labels.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| fail(line, "bad labels"));
                    (
                        name,
                        parse_labels(inner).unwrap_or_else(|| fail(line, "bad labels")),
                    )
                }
                None => (name_labels, HashMap::new()),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                fail(line, "bad metric name");
            }
            let typed = types.iter().any(|(family, kind)| {
                let suffixes: &[&str] = match kind.as_str() {
                    "counter" => &["_total", "_created"],
                    "gauge" => &[""],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    _ => &["_info"],
                };
                suffixes.iter().any(|s| name == format!("{family}{s}"))
            });
            if !typed {
                fail(line, "sample of no # TYPEd family");
            }
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?} in\n{}", self.text);
        found[0].value
    }

    fn labels_of(&self, name: &str, labels: &[(&str, &str)]) -> HashMap<String, String> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
            .labels
            .clone()
    }
}

/// `k="v",k2="v2"` with `\\`, `\"` and `\n` escapes; None if malformed.
fn parse_labels(inner: &str) -> Option<HashMap<String, String>> {
    let mut labels = HashMap::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    _ => return None,
                },
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(_) => return None,
        }
    }
    Some(labels)
}

/// `GET /metrics` from inside `ns`: the status line, the headers and the body.
fn get(ns: &Netns, path: &str) -> (String, String) {
    let addr: SocketAddr = METRICS.parse().expect("addr");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n");
    let response = ns
        .run(|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .expect("netns")
        .expect("scrape");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response}"));
    (head.to_owned(), body.to_owned())
}

fn scrape(ns: &Netns) -> Scrape {
    let (head, body) = get(ns, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    Scrape::parse(&body)
}

/// Scrapes until `done` holds (bounded), returning the last scrape.
fn scrape_until(ns: &Netns, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = scrape(ns);
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_rules(path: &Path, text: &str) {
    std::fs::write(path, text).expect("writing the rules file");
}

#[test]
fn metrics_count_five_proxied_connections_and_keep_a_kept_rules_counters_across_a_reload() {
    require_root();
    let gw = Gateway::new("metrics").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let dir = common::TempDir::new("proxy-metrics");
    let rules = dir.join("rules.toml");
    let rule_1 = "[[rule]]\ndport = \"80\"\non_port = 50080\n";
    write_rules(&rules, rule_1);
    let config = rules.to_str().expect("utf-8 path");
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--config",
            config,
            "--metrics",
            METRICS,
        ],
    );
    assert!(agent.log_contains(&format!("metrics: http://{METRICS}/metrics")));

    for _ in 0..5 {
        let reply = exchange_from_client(&gw, server(80), b"hello");
        assert!(reply.starts_with("peer="), "{reply}");
    }
    let s = scrape_until(&gw.router, |s| {
        s.value("proxy_connections_active", &[]) == 0.0
            && s.value("proxy_connections_ended_total", &[("reason", "done")]) == 5.0
    });
    let rule = [("rule", "1")];
    assert_eq!(
        s.value("proxy_connections_accepted_total", &[]),
        5.0,
        "{}",
        s.text
    );
    assert_eq!(s.value("proxy_connections_active", &[]), 0.0, "{}", s.text);
    assert_eq!(
        s.value("proxy_connections_ended_total", &[("reason", "done")]),
        5.0
    );
    assert_eq!(
        s.value("proxy_connections_ended_total", &[("reason", "refused")]),
        0.0
    );
    assert_eq!(
        s.value("proxy_upstream_connect_seconds_count", &[]),
        5.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.value("proxy_upstream_connect_seconds_bucket", &[("le", "+Inf")]),
        5.0
    );
    assert!(s.value("proxy_relayed_bytes_total", &[("direction", "up")]) >= 25.0);
    assert!(s.value("proxy_relayed_bytes_total", &[("direction", "down")]) > 0.0);
    // Each connection's SYN went to the listener: 5 assigned there, the rest of its
    // packets to the established socket.
    assert_eq!(
        s.value(
            "proxy_classifier_packets_total",
            &[("counter", "assigned_listener")]
        ),
        5.0,
        "{}",
        s.text
    );
    let assigned = s.value("proxy_rule_assigned_total", &rule);
    let packets = s.value("proxy_rule_packets_total", &rule);
    assert!(assigned >= 15.0, "{}", s.text);
    assert!(s.value("proxy_rule_bytes_total", &rule) > 0.0);
    assert_eq!(s.value("proxy_rule_dropped_total", &rule), 0.0);
    assert_eq!(
        s.labels_of("proxy_rule_packets_total", &rule)["description"],
        "tcp dst any dport 80 -> on-port 50080 mark 0x1/0x1"
    );
    assert_eq!(s.value("proxy_classifier_snapshot_ok", &[]), 1.0);
    assert_eq!(
        s.value(
            "proxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
    assert_eq!(
        s.value("proxy_kernel_info", &[("release", release.trim())]),
        1.0
    );
    assert_eq!(s.value("proxy_udp_sessions_active", &[]), 0.0);

    // Anything but /metrics is not found.
    let (head, _) = get(&gw.router, "/");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    let hash_before = s.labels_of("proxy_rules_info", &[])["hash"].clone();
    assert_eq!(hash_before.len(), 16, "{}", s.text);

    // A reload that keeps rule 1 and adds rule 2: rule 1's counts go on from where they
    // were, rule 2 starts at zero.
    write_rules(
        &rules,
        &format!("{rule_1}[[rule]]\ndport = \"8080\"\non_port = 50081\n"),
    );
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGHUP);
    agent
        .wait_for_line(&["reloaded: 2 rule(s) in force"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reload:\n{}", agent.log_text()));
    let after = scrape(&gw.router);
    // The rules changed: so did their hash, and the reload counts as applied.
    assert_ne!(
        after.labels_of("proxy_rules_info", &[])["hash"],
        hash_before,
        "{}",
        after.text
    );
    assert!(
        after.value("proxy_reloads_total", &[("outcome", "applied")]) >= 1.0,
        "{}",
        after.text
    );
    assert_eq!(after.value("proxy_last_reload_ok", &[]), 1.0);
    assert!(
        after.value("proxy_rule_assigned_total", &rule) >= assigned,
        "{}",
        after.text
    );
    assert!(after.value("proxy_rule_packets_total", &rule) >= packets);
    assert_eq!(
        after.value("proxy_rule_packets_total", &[("rule", "2")]),
        0.0
    );
    exchange_from_client(&gw, server(80), b"again");
    let later = scrape_until(&gw.router, |s| {
        s.value("proxy_connections_accepted_total", &[]) == 6.0
    });
    assert_eq!(later.value("proxy_connections_accepted_total", &[]), 6.0);
    assert!(
        later.value("proxy_rule_assigned_total", &rule) > assigned,
        "{}",
        later.text
    );

    agent.stop_ok();
}

#[test]
fn access_log_json_writes_one_object_per_connection_and_udp_session() {
    require_root();
    let gw = Gateway::new("accesslog").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let echo = gw.server.spawn(|| {
        let socket = UdpSocket::bind("0.0.0.0:53").expect("bind :53");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    let dir = common::TempDir::new("proxy-accesslog");
    let out = dir.join("stdout");
    let agent = Agent::start_with_stdout(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--protocol",
            "tcp,udp",
            "--dport",
            "53,80",
            "--on-port",
            "50080",
            "--udp-idle-timeout",
            "1",
            "--access-log",
            "json",
        ],
        &out,
    );

    exchange_from_client(&gw, server(80), b"hello");
    let echoed = gw
        .client
        .run(|| -> std::io::Result<Vec<u8>> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(server(53))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send(b"ping!")?;
            let mut buf = [0u8; 64];
            let n = socket.recv(&mut buf)?;
            Ok(buf[..n].to_vec())
        })
        .expect("netns")
        .expect("udp exchange");
    assert_eq!(echoed, b"ping!");
    let _ = echo.join();

    // Both records, once the session has idled out.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(lines.len(), 2, "{lines:?}\n{}", agent.log_text());
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |proto: &str| {
        records
            .iter()
            .find(|r| r["proto"] == proto)
            .unwrap_or_else(|| panic!("no {proto} record in {lines:?}"))
    };
    let tcp = find("tcp");
    let client_v4 = proxy_testbed::CLIENT_V4.to_string();
    assert!(
        tcp["client"]
            .as_str()
            .expect("client")
            .starts_with(&format!("{client_v4}:")),
        "{tcp}"
    );
    assert_eq!(tcp["orig_dst"], server(80).to_string(), "{tcp}");
    assert_eq!(tcp["rule"], 1, "{tcp}");
    assert_eq!(tcp["upstream"], "direct");
    assert_eq!(tcp["bytes_up"], 5, "{tcp}");
    assert!(tcp["bytes_down"].as_u64().expect("bytes_down") > 0, "{tcp}");
    assert_eq!(tcp["end"], "done", "{tcp}");
    assert!(tcp["duration_ms"].as_f64().is_some(), "{tcp}");
    assert!(tcp["time"].as_str().expect("time").ends_with('Z'), "{tcp}");

    let udp = find("udp");
    assert!(
        udp["client"]
            .as_str()
            .expect("client")
            .starts_with(&format!("{client_v4}:")),
        "{udp}"
    );
    assert_eq!(udp["orig_dst"], server(53).to_string(), "{udp}");
    assert_eq!(udp["rule"], 1, "{udp}");
    assert_eq!(udp["datagrams_up"], 1, "{udp}");
    assert_eq!(udp["datagrams_down"], 1, "{udp}");
    assert_eq!(udp["bytes_up"], 5, "{udp}");
    assert_eq!(udp["bytes_down"], 5, "{udp}");
    assert_eq!(udp["end"], "idle", "{udp}");

    // The text lines are replaced, not doubled.
    let log = agent.stop_ok();
    assert!(!log.contains("bytes up,"), "{log}");
    assert!(!log.contains("datagrams up,"), "{log}");
}

#[test]
fn a_metrics_port_in_use_fails_the_start_with_a_clear_message() {
    require_root();
    let gw = Gateway::new("metricsbusy").expect("topology");
    let _taken = gw
        .router
        .run(|| TcpListener::bind(METRICS))
        .expect("netns")
        .expect("bind");
    let mut args = common::AGENT_ARGS.to_vec();
    args.extend(["--metrics", METRICS]);
    let (status, log) = Agent::spawn(&gw.router, &args).wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "proxy: error: --metrics {METRICS}: the address is already in use"
        )),
        "{log}"
    );
    // Refused before anything changed: no fwmark rule was installed.
    let rules = common::ip_stdout(&gw.router, &["rule", "show"]);
    assert!(!rules.contains("fwmark"), "{rules}");
}
