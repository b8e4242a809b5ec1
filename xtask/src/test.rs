//! `cargo xtask test`: every test, unit and kernel, after installing what they need.

use std::process::Command;

use clap::Args;

use crate::prereqs;

#[derive(Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...), after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    prereqs::require_root("the kernel tests")?;
    prereqs::ensure_build()?;
    prereqs::ensure_system_tools()?;
    let mut cmd = Command::new(env!("CARGO"));
    // The default members: everything but the eBPF crate, which only builds for BPF.
    cmd.arg("test");
    if !opts.args.is_empty() {
        cmd.arg("--").args(&opts.args);
    }
    prereqs::status(&mut cmd)
}
