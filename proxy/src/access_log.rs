//! `--access-log`: one record per ended TCP connection and UDP session. `text` (the
//! default) is the closing line in the agent's log (stderr); `json` writes one JSON object
//! per line on stdout instead, for a log shipper:
//!
//! ```text
//! {"time":"2026-05-01T12:00:00.123Z","proto":"tcp","client":"192.0.2.2:43650","orig_dst":"198.51.100.2:80","rule":1,"upstream":"direct","bytes_up":6,"bytes_down":35,"duration_ms":2.5,"end":"done","detail":"done"}
//! ```
//!
//! `rule` is the first rule in force whose protocol, destination prefixes and ports match
//! the original destination, as the classifier picks it (null if none does any more, after
//! a reload); `end` is the closing line's first word (UDP: `idle` or `error`), `detail`
//! its full words. UDP records also carry `datagrams_up` and `datagrams_down`.

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{rules::Rule, upstream::Upstream};

/// `--access-log`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLog {
    /// The closing line in the agent's log.
    #[default]
    Text,
    /// One JSON object per line on stdout.
    Json,
}

static JSON: AtomicBool = AtomicBool::new(false);
/// The rules in force, for `rule`; only kept with `--access-log json`.
static RULES: RwLock<Option<Arc<Vec<Rule>>>> = RwLock::new(None);

/// Chooses the format, once at start.
pub fn set_format(format: AccessLog) {
    JSON.store(format == AccessLog::Json, Ordering::Relaxed);
}

/// True with `--access-log json`: the caller writes a [`Record`] instead of its text line.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// The rules now in force (at start and after each reload).
pub fn rules_in_force(rules: &[Rule]) {
    if !json() {
        return;
    }
    if let Ok(mut current) = RULES.write() {
        *current = Some(Arc::new(rules.to_vec()));
    }
}

/// The number (from 1) of the first rule in force for `proto` that matches `orig_dst`.
fn rule_for(udp: bool, orig_dst: SocketAddr) -> Option<usize> {
    let rules = RULES.read().ok()?.clone()?;
    rules
        .iter()
        .position(|r| {
            let protocol = if udp { IPPROTO_UDP } else { IPPROTO_TCP };
            r.covers(protocol, orig_dst.ip(), orig_dst.port())
        })
        .map(|i| i + 1)
}

/// How the proxy reached the destination, without credentials.
fn upstream_name(upstream: &Upstream) -> String {
    match upstream {
        Upstream::Direct => "direct".to_owned(),
        Upstream::SpoofSource => "spoof-source".to_owned(),
        Upstream::Socks5(server) => format!("socks5://{}", server.addr),
    }
}

/// One ended connection or session.
pub struct Record<'a> {
    pub udp: bool,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    pub upstream: &'a Upstream,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// UDP only.
    pub datagrams: Option<(u64, u64)>,
    pub duration: Duration,
    pub end: &'static str,
    pub detail: String,
}

impl Record<'_> {
    fn to_json(&self, now: SystemTime) -> serde_json::Value {
        let mut object = serde_json::json!({
            "time": rfc3339_millis(now),
            "proto": if self.udp { "udp" } else { "tcp" },
            "client": self.client.to_string(),
            "orig_dst": self.orig_dst.to_string(),
            "rule": rule_for(self.udp, self.orig_dst),
            "upstream": upstream_name(self.upstream),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": (self.duration.as_secs_f64() * 1e4).round() / 10.0,
            "end": self.end,
            "detail": self.detail,
        });
        if let (Some((up, down)), Some(map)) = (self.datagrams, object.as_object_mut()) {
            map.insert("datagrams_up".into(), up.into());
            map.insert("datagrams_down".into(), down.into());
        }
        object
    }

    /// Writes the record as one line on stdout.
    pub fn write(&self) {
        let line = format!("{}\n", self.to_json(SystemTime::now()));
        // One write of the whole line, so that records of several threads never mix.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// `2026-05-01T12:00:00.123Z` (UTC).
fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil, inverted).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        let t = |secs: u64, millis: u64| {
            rfc3339_millis(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
        };
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(t(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(t(1_777_636_800, 123), "2026-05-01T12:00:00.123Z");
    }

    #[test]
    fn a_udp_record_has_every_field() {
        let record = Record {
            udp: true,
            client: "192.0.2.2:5000".parse().expect("addr"),
            orig_dst: "198.51.100.2:53".parse().expect("addr"),
            upstream: &Upstream::Direct,
            bytes_up: 10,
            bytes_down: 20,
            datagrams: Some((1, 2)),
            duration: Duration::from_millis(1500),
            end: "idle",
            detail: "idle".into(),
        };
        let v = record.to_json(UNIX_EPOCH);
        assert_eq!(v["proto"], "udp");
        assert_eq!(v["orig_dst"], "198.51.100.2:53");
        assert_eq!(v["datagrams_down"], 2);
        assert_eq!(v["duration_ms"], 1500.0);
        assert_eq!(v["upstream"], "direct");
        assert!(v["rule"].is_null());
    }
}
