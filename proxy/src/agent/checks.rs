//! Checks of the rules against the other settings, made before anything is touched. A
//! reload runs them again on its new rules.

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
