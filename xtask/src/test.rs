//! `cargo xtask test`: every test, unit and kernel, after installing what they need, with
//! one closing line that adds up every test binary's results and the tests skipped because
//! the kernel lacks what they test.
//!
//! `--kernel VERSION` (or `all`) runs the kernel tests on stock kernels under QEMU instead
//! ([`crate::kernels`]); [`GUEST_TESTS`] says which, and why.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{kernels, prereqs};

#[derive(Args)]
pub struct Options {
    /// Run the kernel tests on stock kernels booted under QEMU instead of this machine's:
    /// 5.10, 6.1, 6.12 (several separated by commas), or all.
    #[arg(long, value_name = "VERSION")]
    kernel: Option<String>,
    /// With `--kernel`: these test binaries (by name, separated by commas) instead of the
    /// ones chosen for the matrix.
    #[arg(long, value_name = "NAMES", requires = "kernel")]
    binaries: Option<String>,
    /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...), after `--`; with
    /// `--kernel`, for each test binary in the guest.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// The environment variable naming the file where a test that the kernel cannot run
/// writes why (`proxy/tests/common/kernel.rs`).
const SKIPS_ENV: &str = "PROXY_TEST_SKIPS";

/// The environment variable by which tests that wait on time stretch their waits (not what
/// they assert) under emulation (`proxy/tests/common/kernel.rs`).
const TIME_SCALE_ENV: &str = "PROXY_TEST_TIME_SCALE";

/// How much longer a wait may take under QEMU's emulation, where the agent's start (the
/// verifier above all) takes up to 20 s instead of 2.
const GUEST_TIME_SCALE: u32 = 5;

/// The test binaries run under emulation, and why each: what differs between kernels is
/// the verifier, the helpers, the attach, and netfilter's own TPROXY, which these four
/// cover. Measured on a 2-core machine: 6.1 takes about 11 minutes, 5.10 about 20 (the
/// conformance cases most of it). The others stay on the host: they test what does not
/// change between kernels (command line, rules files, the handover protocol, the systemd
/// unit), or load and timing, which emulation distorts; `--binaries` runs any of them.
const GUEST_TESTS: &[(&str, &str)] = &[
    (
        "classifier",
        "every program loads (the verifier), and crafted frames take the expected path",
    ),
    (
        "doctor",
        "the doctor's checks on this kernel, and what it says it lacks",
    ),
    (
        "data_plane",
        "TCP and UDP through the proxy: relays, upstreams, limits, sockmap where it runs",
    ),
    (
        "conformance",
        "the 90 differential cases against this kernel's own iptables TPROXY",
    ),
];

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
    match &opts.kernel {
        None => on_this_kernel(workspace, opts),
        Some(name) => {
            let chosen: Vec<&str> = match &opts.binaries {
                Some(names) => names.split(',').collect(),
                None => GUEST_TESTS.iter().map(|(name, _)| *name).collect(),
            };
            on_kernels(workspace, &kernels::select(name)?, &chosen, &opts.args)
        }
    }
}

fn on_this_kernel(workspace: &Path, opts: &Options) -> anyhow::Result<()> {
    prereqs::ensure_dist_validators(workspace)?;
    prereqs::ensure_systemd_root(workspace)?;
    let skips = workspace.join("target/test-skips");
    let _ = std::fs::remove_file(&skips);
    let mut cmd = Command::new(env!("CARGO"));
    // The default members: everything but the eBPF crate, which only builds for BPF.
    cmd.arg("test").env(SKIPS_ENV, &skips);
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
    let skipped = read_skips(&skips);
    print_skips(&skipped);
    println!(
        "all tests: {} passed ({} of them skipped: the kernel cannot), {} failed",
        totals.passed,
        skipped.len(),
        totals.failed
    );
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

/// The `test name: reason` lines the tests wrote, by test.
fn read_skips(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(test, why)| (test.to_owned(), why.to_owned()))
        .collect()
}

fn print_skips(skipped: &BTreeMap<String, String>) {
    // One line per reason, with the tests it covers.
    let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (test, why) in skipped {
        by_reason.entry(why).or_default().push(test);
    }
    for (why, tests) in by_reason {
        println!(
            "skipped {} test(s): {why}: {}",
            tests.len(),
            tests.join(", ")
        );
    }
}

/// One kernel's outcome.
struct KernelRun {
    release: String,
    totals: Totals,
    skipped: BTreeMap<String, String>,
    took: Duration,
    rc: i32,
}

/// The `chosen` test binaries ([`GUEST_TESTS`] unless told) on each kernel in turn, then a
/// table of the outcomes.
fn on_kernels(
    workspace: &Path,
    series: &[&kernels::KernelSeries],
    chosen: &[&str],
    args: &[String],
) -> anyhow::Result<()> {
    let binaries = test_binaries()?;
    let cache = workspace.join("target/kernels");
    let mut runs = Vec::new();
    for series in series {
        let kernel = kernels::fetch(series, &cache)?;
        println!(
            "== {} ({}): {}",
            series.name,
            series.distribution,
            chosen.join(", ")
        );
        let output = cache.join(format!("run-{}", series.name));
        let mut commands = format!(
            "export {SKIPS_ENV}={guest}/skips {TIME_SCALE_ENV}={GUEST_TIME_SCALE} RUST_BACKTRACE=1\n\
             cd {workspace}\nfailed=0\n",
            guest = kernels::initramfs::GUEST_OUTPUT,
            workspace = shell_quote(workspace),
        );
        for name in chosen {
            let binary = binaries
                .get(*name)
                .with_context(|| format!("no test binary {name}"))?;
            commands.push_str(&format!(
                "echo \"{mark} running {name}\"\n{binary} --color never {args} 2>&1 || failed=1\n",
                mark = kernels::guest::MARK,
                binary = shell_quote(binary),
                args = args
                    .iter()
                    .map(|a| shell_quote(Path::new(a)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ));
        }
        commands.push_str("exit $failed");
        let mut totals = Totals::default();
        let started = Instant::now();
        let rc = kernels::guest::run(kernels::guest::Run {
            kernel: &kernel,
            output: output.clone(),
            commands,
            deadline: Duration::from_secs(40 * 60),
            on_line: &mut |line| totals.add_line(line),
        })?;
        let skipped = read_skips(&output.join("skips"));
        print_skips(&skipped);
        runs.push(KernelRun {
            release: kernel.release.clone(),
            totals,
            skipped,
            took: started.elapsed(),
            rc,
        });
    }
    println!("| kernel | passed | of them skipped | failed | time |");
    println!("|---|---:|---:|---:|---:|");
    for run in &runs {
        println!(
            "| {} | {} | {} | {} | {} s |",
            run.release,
            run.totals.passed,
            run.skipped.len(),
            run.totals.failed,
            run.took.as_secs()
        );
    }
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| r.rc != 0 || r.totals.failed > 0)
        .map(|r| r.release.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("kernel tests failed on {}", failed.join(", "));
    }
    Ok(())
}

/// The test binaries of the workspace's default members, by target name, built now.
fn test_binaries() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let output = Command::new(env!("CARGO"))
        .args(["test", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("building the tests")?;
    if !output.status.success() {
        bail!("building the tests failed");
    }
    let mut binaries = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["profile"]["test"] == true
            && let (Some(name), Some(executable)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            )
        {
            binaries.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    Ok(binaries)
}

/// `path` in single quotes for the guest's shell.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
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
