//! iptables and nftables rules that touch the tproxy mark, or TPROXY rules of another
//! setup: they see the packets after the classifier (PREROUTING comes after TC ingress) and
//! can re-mark, re-assign or drop them. Read from `nft list ruleset`, `iptables-save` and
//! `ip6tables-save` where the tools exist; without them the check is skipped.

use std::{io, process::Command};

use super::{Finding, Settings};
use crate::rules::{Mark, parse_u32};

/// Whether `value` (a mark a rule sets or matches, under `mask`) can be one of `marks`.
fn touches(value: u32, mask: u32, marks: &[Mark]) -> bool {
    marks
        .iter()
        .any(|m| m.value != 0 && (value ^ m.value) & mask & m.mask == 0 && mask & m.mask != 0)
}

/// The lines of an `iptables-save` listing with a TPROXY target, or that set or match a
/// mark that can be the tproxy mark.
pub fn scan_iptables(text: &str, marks: &[Mark]) -> Vec<String> {
    text.lines()
        .filter(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            tokens.windows(2).any(|w| match w {
                ["-j", "TPROXY"] => true,
                [
                    "--set-xmark" | "--set-mark" | "--mark" | "--tproxy-mark",
                    value,
                ] => {
                    let (value, mask) = value.split_once('/').unwrap_or((value, "0xffffffff"));
                    match (parse_u32(value), parse_u32(mask)) {
                        (Some(value), Some(mask)) => touches(value, mask, marks),
                        _ => false,
                    }
                }
                _ => false,
            })
        })
        .map(|l| l.trim().to_owned())
        .collect()
}

/// The rule lines of an `nft list ruleset` listing with a tproxy statement, or that set or
/// compare the packet mark with a value that can be the tproxy mark.
pub fn scan_nft(text: &str, marks: &[Mark]) -> Vec<String> {
    text.lines()
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            if lower.contains("tproxy") {
                return true;
            }
            let Some((_, after)) = lower.split_once("mark") else {
                return false;
            };
            // `meta mark set 0x1`, `mark 0x1`, `meta mark & 0x1 == 0x1`: any number after
            // the word that can be a tproxy mark.
            after
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter_map(parse_u32)
                .any(|n| touches(n, u32::MAX, marks))
        })
        .map(|l| l.trim().to_owned())
        .collect()
}

/// The findings of one tool: `listing` its output, `Err` when it could not run.
pub fn findings(
    tool: &str,
    listing: io::Result<(bool, String)>,
    lines: impl Fn(&str) -> Vec<String>,
) -> Finding {
    match listing {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Finding::info("netfilter", format!("{tool} not installed: not checked"))
        }
        Err(e) => Finding::info(
            "netfilter",
            format!("{tool} could not run ({e}): not checked"),
        ),
        Ok((false, _)) => Finding::info("netfilter", format!("{tool} failed: not checked")),
        Ok((true, text)) => {
            let found = lines(&text);
            if found.is_empty() {
                Finding::ok(
                    "netfilter",
                    format!("{tool}: no TPROXY rule, no rule on the tproxy mark"),
                )
            } else {
                Finding::warning(
                    "netfilter",
                    format!(
                        "{tool}: rules that touch the tproxy mark or do TPROXY themselves, \
                         after the classifier: {}",
                        found.join(" | ")
                    ),
                    "remove them, or pick another --tproxy-mark",
                )
            }
        }
    }
}

fn list(program: &str, args: &[&str]) -> io::Result<(bool, String)> {
    let output = Command::new(program).args(args).output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

pub(super) fn check(settings: &Settings<'_>) -> Vec<Finding> {
    let marks = settings.marks();
    vec![
        findings("nft list ruleset", list("nft", &["list", "ruleset"]), |t| {
            scan_nft(t, &marks)
        }),
        findings("iptables-save", list("iptables-save", &[]), |t| {
            scan_iptables(t, &marks)
        }),
        findings("ip6tables-save", list("ip6tables-save", &[]), |t| {
            scan_iptables(t, &marks)
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    const MARK: Mark = Mark { value: 1, mask: 1 };

    #[test]
    fn iptables_tproxy_and_mark_rules_are_found() {
        let text = "*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 50080 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A OUTPUT -j MARK --set-xmark 0x2/0xffffffff
-A OUTPUT -m mark --mark 0x40000000 -j ACCEPT
COMMIT";
        let found = scan_iptables(text, &[MARK]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("TPROXY"));
        assert!(found[1].contains("--set-xmark 0x1/"));
    }

    #[test]
    fn nft_tproxy_and_mark_rules_are_found() {
        let text = "table ip mangle {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto tcp tproxy to :50080 meta mark set 0x00000001 accept
		meta mark set 0x00000002
		ct mark 0x00000001 counter
		meta mark 0x00000004 drop
	}
}";
        let found = scan_nft(text, &[MARK]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("tproxy"));
        assert!(found[1].starts_with("ct mark"));
    }

    #[test]
    fn an_absent_tool_is_skipped_with_an_info_line() {
        let absent = findings(
            "nft list ruleset",
            Err(io::Error::from(io::ErrorKind::NotFound)),
            |_| Vec::new(),
        );
        assert_eq!(absent.severity, Severity::Info);
        assert!(absent.what.contains("not installed"));
        let clean = findings("iptables-save", Ok((true, String::new())), |_| Vec::new());
        assert_eq!(clean.severity, Severity::Ok);
        let found = findings("iptables-save", Ok((true, String::new())), |_| {
            vec!["-j TPROXY".into()]
        });
        assert_eq!(found.severity, Severity::Warning);
    }
}
