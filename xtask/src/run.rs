//! `cargo xtask run -- ARGS`: build the agent (release) and run it; `cargo xtask demo`: build
//! the agent and `proxy-demo` (release) and run the demo with that agent.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::Context as _;
use clap::Args;

use crate::prereqs;

#[derive(Args)]
pub struct Options {
    /// Arguments for the agent binary, after `--` (for example `run --iface eth0 ...`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Args)]
pub struct DemoOptions {
    /// Arguments for `proxy-demo` (for example `--connections 5`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// The workspace's root directory.
pub fn workspace_root() -> anyhow::Result<std::path::PathBuf> {
    Ok(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask is inside the workspace")?
        .to_path_buf())
}

/// Builds `packages` in release mode (`proxy` is the agent, with its eBPF object embedded)
/// and returns the directory the binaries are in: under CARGO_TARGET_DIR when set (relative
/// to the workspace, where cargo runs), else under target/.
pub fn build_release(packages: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    prereqs::ensure_build()?;
    let root = workspace_root()?;
    eprintln!(
        "xtask: building {} (release, eBPF object embedded)",
        packages.join(", ")
    );
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(&root).args(["build", "--release"]);
    for package in packages {
        cmd.args(["--package", package]);
    }
    prereqs::status(&mut cmd)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    Ok(target.join("release"))
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let binary = build_release(&["proxy"])?.join("proxy");
    let err = Command::new(&binary).args(&opts.args).exec();
    Err(err).with_context(|| format!("running {}", binary.display()))
}

pub fn demo(opts: &DemoOptions) -> anyhow::Result<()> {
    prereqs::require_root("the demo")?;
    prereqs::ensure_system_tools()?;
    let release = build_release(&["proxy", "proxy-testbed"])?;
    let binary = release.join("proxy-demo");
    let err = Command::new(&binary)
        .arg("--agent")
        .arg(release.join("proxy"))
        .args(&opts.args)
        .exec();
    Err(err).with_context(|| format!("running {}", binary.display()))
}
