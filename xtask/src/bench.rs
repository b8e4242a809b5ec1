//! `cargo xtask bench [--quick]`: build the agent and the benchmark (the `proxy-bench`
//! crate) in release mode, then run `proxy-bench`, which compares plain routing, the kernel's
//! iptables TPROXY with this project's proxy, and this project's eBPF classifier with the same
//! proxy, in throwaway network namespaces. Results go to `bench/results/` (latest.md,
//! latest.png and a timestamped copy of each).

use std::process::Command;

use clap::Args;

use crate::{prereqs, run};

#[derive(Args)]
pub struct Options {
    /// Fewer and shorter runs: under 2 minutes instead of under 10.
    #[arg(long)]
    quick: bool,
}

pub fn bench(opts: &Options) -> anyhow::Result<()> {
    prereqs::require_root("the benchmarks")?;
    prereqs::ensure_system_tools()?;
    let release = run::build_release(&["proxy", "proxy-bench"])?;
    let root = run::workspace_root()?;
    let mut cmd = Command::new(release.join("proxy-bench"));
    cmd.current_dir(&root)
        .arg("--agent")
        .arg(release.join("proxy"))
        .arg("--out")
        .arg(root.join("bench/results"));
    if opts.quick {
        cmd.arg("--quick");
    }
    prereqs::status(&mut cmd)
}
