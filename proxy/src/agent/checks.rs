//! Checks of the rules against the other settings, made before anything is touched. A
//! reload runs them again on its new rules.

use aya::util::KernelVersion;

use crate::kernel_features::Feature;

use super::{AgentError, LocalScope};
use crate::{config::ListenerMode, rules::Rule};

/// Checks that this version can serve `rules` with the chosen listener mode.
pub fn check_supported(rules: &[Rule], mode: ListenerMode) -> Result<(), AgentError> {
    if mode == ListenerMode::External {
        return Ok(());
    }
    for (i, rule) in rules.iter().enumerate() {
        if rule.on_port == 0 {
            return Err(AgentError::Unsupported(format!(
                "rule {}: on-port 0 (the packet's own port) needs --listener external",
                i + 1
            )));
        }
    }
    Ok(())
}

/// The outbound mark must not look like a tproxy mark: the fwmark rule would route the
/// proxy's own connections to the local table, back to itself.
pub fn check_outbound_mark(rules: &[Rule], outbound_mark: u32) -> Result<(), AgentError> {
    if outbound_mark == 0 {
        return Err(AgentError::Unsupported(
            "--outbound-mark must not be 0".into(),
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        if outbound_mark & rule.mark.mask == rule.mark.value {
            return Err(AgentError::Unsupported(format!(
                "--outbound-mark {outbound_mark:#x} matches rule {}'s tproxy mark {}: the proxy's own traffic would be routed back to it",
                i + 1,
                rule.mark
            )));
        }
    }
    Ok(())
}

/// A rule's own cgroups (`cgroup = [...]` in a rules file) must lie inside the cgroups the
/// programs are attached to (the `--cgroup` paths, else the root, which holds every one):
/// the programs run only there, so a rule scoped to a cgroup elsewhere would never apply
/// and its traffic would go past the proxy unseen.
pub fn check_local_scope(rules: &[Rule], local: Option<&LocalScope>) -> Result<(), AgentError> {
    let Some(local) = local else {
        return Ok(());
    };
    for (i, rule) in rules.iter().enumerate() {
        for cgroup in rule.local.iter().flatten() {
            if !local.attach_to.iter().any(|a| cgroup.is_within(a)) {
                let attached: Vec<&str> = local.attach_to.iter().map(|a| a.name.as_str()).collect();
                return Err(AgentError::Unsupported(format!(
                    "rule {}: cgroup {} lies outside the --cgroup paths ({}), where the \
                     programs that would apply it do not run",
                    i + 1,
                    cgroup.name,
                    attached.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Why `--relay sockmap` has a minimum kernel ([`Feature::SockmapRelay`], 6.12, in the one
/// table of `kernel_features`). Redirecting a socket's bytes with sockmap has a record of kernel bugs that other proxies met in production: dae turned its
/// sockmap fast path off after a splice + redirect bug broke connections (dae #518; a fix
/// was posted in June 2025 and is expected in 6.12-based kernels), and removed it in
/// January 2026 after more (dae #912: an sk_skb stream EOF bug among them; dae #999 names
/// kernel panics). This relay never splices a redirected socket and has only been run on
/// 6.18; older kernels are refused rather than guessed at.
///
/// `--relay sockmap` on this kernel: refused below that minimum (or when the version cannot
/// be read), else allowed with the warning returned.
pub fn check_sockmap_relay(kernel: Option<KernelVersion>) -> Result<String, AgentError> {
    let min = Feature::SockmapRelay.min_kernel();
    match kernel {
        Some(version) if version >= min => Ok("--relay sockmap: bytes are redirected inside \
             the kernel by sockmap, a kernel feature with a record of bugs (other proxies \
             dropped it after broken connections and panics); it has only been tested on \
             6.18. --relay splice (the default) does not depend on it"
            .to_owned()),
        Some(have) => Err(AgentError::Unsupported(format!(
            "--relay sockmap needs Linux {min} or later (this is {have}): older kernels have sockmap redirect bugs that break \
             or crash connections; use --relay splice (the default)"
        ))),
        None => Err(AgentError::Unsupported(format!(
            "--relay sockmap needs Linux {min} or later, and this kernel's version \
             could not be read; use --relay splice (the default)"
        ))),
    }
}

#[cfg(test)]
mod sockmap_relay_tests {
    use super::*;

    #[test]
    fn refused_below_6_12_or_when_unknown_warned_from_it() {
        let v = |major, minor| Some(KernelVersion::new(major, minor, 0));
        let refusal = check_sockmap_relay(v(6, 11)).expect_err("6.11 is refused");
        assert!(refusal.to_string().contains("6.12.0"), "{refusal}");
        assert!(check_sockmap_relay(v(5, 15)).is_err());
        assert!(check_sockmap_relay(None).is_err());
        let warning = check_sockmap_relay(v(6, 12)).expect("6.12 runs it");
        assert!(warning.contains("--relay splice"), "{warning}");
        assert!(check_sockmap_relay(v(6, 18)).is_ok());
        assert!(check_sockmap_relay(v(7, 0)).is_ok());
    }
}
