//! `cargo xtask run -- ARGS` and `cargo xtask demo`: build the agent (release) and run it.

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
    /// Arguments for `proxy demo`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn build_release() -> anyhow::Result<std::path::PathBuf> {
    prereqs::ensure_build()?;
    eprintln!("xtask: building the agent (release, eBPF object embedded)");
    prereqs::status(Command::new(env!("CARGO")).args([
        "build",
        "--release",
        "--package",
        "proxy",
    ]))?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask is inside the workspace")?;
    Ok(root.join("target/release/proxy"))
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let binary = build_release()?;
    let err = Command::new(&binary).args(&opts.args).exec();
    Err(err).with_context(|| format!("running {}", binary.display()))
}

pub fn demo(opts: &DemoOptions) -> anyhow::Result<()> {
    prereqs::require_root("the demo")?;
    prereqs::ensure_system_tools()?;
    let binary = build_release()?;
    let err = Command::new(&binary).arg("demo").args(&opts.args).exec();
    Err(err).with_context(|| format!("running {}", binary.display()))
}
