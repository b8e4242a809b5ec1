//! `cargo xtask bench [--quick]`: build the agent and the benchmark in release mode, then
//! run `proxy-bench`, which compares plain routing, the kernel's iptables TPROXY with this
//! project's proxy, and this project's eBPF classifier with the same proxy, in throwaway
//! network namespaces. Results go to `bench/results/` (latest.md, latest.png and a
//! timestamped copy of each).

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;
use clap::Args;

use crate::prereqs;

#[derive(Args)]
pub struct Options {
    /// Fewer and shorter runs: under 2 minutes instead of under 10.
    #[arg(long)]
    quick: bool,
}

pub fn bench(opts: &Options) -> anyhow::Result<()> {
    prereqs::require_root("the benchmarks")?;
    prereqs::ensure_build()?;
    prereqs::ensure_system_tools()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask is inside the workspace")?
        .to_path_buf();
    eprintln!("xtask: building the agent and the benchmark (release, eBPF object embedded)");
    prereqs::status(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "proxy",
    ]))?;
    // Where cargo put them: CARGO_TARGET_DIR when set (relative to the workspace, where
    // cargo ran), else target/.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let release = target.join("release");
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
