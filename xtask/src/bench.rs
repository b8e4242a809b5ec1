//! `cargo xtask bench [--quick] [--only FIGURES]`: build the agent and the benchmark (the `proxy-bench`
//! crate) in release mode, then run `proxy-bench`, which compares plain routing, the kernel's
//! iptables TPROXY with this project's proxy, this project's eBPF classifier with the same
//! proxy, and the iptables recipe with HAProxy (the peer), in throwaway network namespaces;
//! what the agent costs traffic no rule matches; UDP throughput, routed and proxied; and what
//! `--local`'s connect programs cost the host's own connections. Results go to `bench/results/` (latest.md,
//! latest.png and a timestamped copy of each).

use std::process::Command;

use clap::Args;

use crate::{prereqs, run};

#[derive(Args)]
pub struct Options {
    /// Fewer and shorter runs: under 2 minutes instead of under 10.
    #[arg(long)]
    quick: bool,
    /// Measure only these figures (comma-separated: bulk, conn, latency, rss, udp, rules, upgrade,
    /// passthrough, udprate, local); passed on to proxy-bench.
    #[arg(long, value_name = "FIGURES")]
    only: Option<String>,
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
    if let Some(only) = &opts.only {
        cmd.arg("--only").arg(only);
    }
    prereqs::status(&mut cmd)
}
