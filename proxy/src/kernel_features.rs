//! What the agent uses of the kernel beyond its baseline (5.10: `bpf_sk_assign` at TC,
//! `sk_lookup`, cgroup connect programs), from which version, and what it does without:
//! one table that the agent's decisions, the doctor and the tests' skips all read.

use aya::util::KernelVersion;

/// A kernel feature that some of the agent's modes need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// TCX links (`bpf_link` at TC), 6.6.
    Tcx,
    /// `bpf_sk_assign` to a SO_REUSEPORT listener (6.5: before it, -ESOCKTNOSUPPORT).
    ReuseportAssign,
    /// `--relay sockmap`, refused below 6.12 by choice: see
    /// [`crate::agent::checks::check_sockmap_relay`].
    SockmapRelay,
}

impl Feature {
    pub const ALL: [Feature; 3] = [
        Feature::Tcx,
        Feature::ReuseportAssign,
        Feature::SockmapRelay,
    ];

    /// The first kernel that has it.
    pub const fn min_kernel(self) -> KernelVersion {
        match self {
            Feature::Tcx => KernelVersion::new(6, 6, 0),
            Feature::ReuseportAssign => KernelVersion::new(6, 5, 0),
            Feature::SockmapRelay => KernelVersion::new(6, 12, 0),
        }
    }

    /// What it is, for a user.
    pub const fn what(self) -> &'static str {
        match self {
            Feature::Tcx => "TCX links",
            Feature::ReuseportAssign => {
                "bpf_sk_assign to a SO_REUSEPORT listener (several TCP workers)"
            }
            Feature::SockmapRelay => "--relay sockmap",
        }
    }

    /// What the agent does on a kernel without it.
    pub const fn without(self) -> &'static str {
        match self {
            Feature::Tcx => "attaches with clsact + cls_bpf over netlink",
            Feature::ReuseportAssign => {
                "runs one TCP worker; --workers above 1 is refused with this reason"
            }
            Feature::SockmapRelay => {
                "refuses --relay sockmap and says why; --relay splice (the default) runs"
            }
        }
    }

    /// Whether a kernel of `version` has it (an unknown version has none).
    pub fn on(self, version: Option<KernelVersion>) -> bool {
        version.is_some_and(|v| v >= self.min_kernel())
    }

    /// Whether the running kernel has it.
    pub fn here(self) -> bool {
        self.on(KernelVersion::current().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_feature_starts_at_its_version() {
        for feature in Feature::ALL {
            let min = feature.min_kernel();
            assert!(feature.on(Some(min)));
            assert!(feature.on(Some(KernelVersion::new(7, 0, 0))));
            assert!(!feature.on(Some(KernelVersion::new(5, 10, 0))));
            assert!(!feature.on(None));
        }
    }
}
