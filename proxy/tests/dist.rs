//! The service files under `dist/`: the sample rules file and the unit's command line are
//! what `proxy run` accepts (the agent's own parsers), the systemd unit passes
//! `systemd-analyze verify`, the Kubernetes manifests pass `kubernetes-validate` (the
//! API's schemas, strict). `cargo xtask test` installs both validators; where one is missing
//! the test fails and says how to get it (it never passes without having validated).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use proxy::config::{Cli, Command as ProxyCommand};

fn dist(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(path)
}

/// `proxy ARGS` as the agent parses them, for `run`, with the rules of its `--config`
/// compiled.
fn parse_run(args: &[&str]) -> usize {
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let ProxyCommand::Run(run) = cli.command else {
        panic!("{args:?}: not `proxy run`");
    };
    let rules = run.rules().unwrap_or_else(|e| panic!("{args:?}: {e:?}"));
    proxy::rules::compile(&rules).unwrap_or_else(|e| panic!("{args:?}: {e:?}"));
    rules.len()
}

#[test]
fn the_sample_rules_file_is_what_the_unit_runs_and_it_parses() {
    let unit = std::fs::read_to_string(dist("systemd/proxy.service")).expect("the unit");
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    let rules = dist("rules.toml");
    let rules = rules.to_str().expect("utf-8 path");
    // The unit's command line, with the installed rules file's path pointing at the sample.
    let args: Vec<&str> = exec_start
        .split_whitespace()
        .map(|a| {
            if a == "/etc/proxy/rules.toml" {
                rules
            } else {
                a
            }
        })
        .collect();
    assert_eq!(args[0], "/usr/local/bin/proxy", "{exec_start}");
    assert!(
        args.contains(&rules),
        "the unit does not run the sample's path: {exec_start}"
    );
    assert_eq!(parse_run(&args), 2);
}

/// A validator's path; a missing one fails the test, naming what installs it.
fn validator(program: &str, also_in: &[PathBuf]) -> PathBuf {
    if let Ok(path) = which(program) {
        return path;
    }
    if let Some(path) = also_in.iter().map(|d| d.join(program)).find(|p| p.exists()) {
        return path;
    }
    panic!("{program} not found: `cargo xtask test` installs it");
}

fn which(program: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Runs a validator; it passes when it succeeds and prints no warning on stderr
/// (`systemd-analyze verify` only warns about an unknown key or a bad value, and exits 0).
fn assert_validates(mut cmd: Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{cmd:?}: {}\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_systemd_unit_verifies() {
    let analyze = validator("systemd-analyze", &[]);
    // verify checks that ExecStart='s program exists: the unit as installed, with the
    // built agent where it would be installed.
    let unit = std::fs::read_to_string(dist("systemd/proxy.service")).expect("the unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/proxy "));
    let dir = std::env::temp_dir().join(format!("proxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join("proxy.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/proxy", env!("CARGO_BIN_EXE_proxy")),
    )
    .expect("writing the copy");
    let mut cmd = Command::new(analyze);
    cmd.args(["verify", "--man=no"]).arg(&copy);
    assert_validates(cmd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_kubernetes_manifests_validate() {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist-validators/bin");
    let validate = validator("kubernetes-validate", &[venv]);
    let mut cmd = Command::new(validate);
    cmd.args(["--strict", "--quiet"])
        .arg(dist("kubernetes/daemonset.yaml"));
    assert_validates(cmd);
}
