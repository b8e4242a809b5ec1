//! `cargo xtask test`: every test, unit and kernel, after installing what they need, with
//! one closing line that adds up every test binary's results.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::prereqs;

#[derive(Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...), after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Adds up `test result: ok. N passed; M failed; ...` lines.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    prereqs::require_root("the kernel tests")?;
    prereqs::ensure_build()?;
    prereqs::ensure_system_tools()?;
    // xtask's manifest directory is one below the workspace's.
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace directory")?;
    prereqs::ensure_dist_validators(workspace)?;
    prereqs::ensure_systemd_root(workspace)?;
    let mut cmd = Command::new(env!("CARGO"));
    // The default members: everything but the eBPF crate, which only builds for BPF.
    cmd.arg("test");
    if !opts.args.is_empty() {
        cmd.arg("--").args(&opts.args);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut totals = Totals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            totals.add_line(&line);
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!(
        "all tests: {} passed, {} failed",
        totals.passed, totals.failed
    );
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_cargo_result_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 19 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.19s");
        t.add_line(
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 21,
                failed: 1
            }
        );
    }
}
