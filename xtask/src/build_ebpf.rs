//! `cargo xtask build-ebpf`: the classifier object alone, as `proxy/build.rs` builds it.

use std::process::Command;

use clap::Args;

use crate::prereqs;

#[derive(Args)]
pub struct Options {
    /// Build with debug assertions instead of --release.
    #[arg(long)]
    debug: bool,
}

pub fn build_ebpf(opts: &Options) -> anyhow::Result<()> {
    prereqs::ensure_build()?;
    let toolchain = prereqs::ebpf_toolchain();
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &toolchain,
        "cargo",
        "build",
        "--package",
        "proxy-ebpf",
        "--bins",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]);
    if !opts.debug {
        cmd.arg("--release");
    }
    if toolchain != "nightly" {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\u{1f}-Clink-arg=--btf",
    );
    prereqs::status(&mut cmd)?;
    let profile = if opts.debug { "debug" } else { "release" };
    eprintln!("xtask: eBPF object at target/bpfel-unknown-none/{profile}/proxy-ebpf");
    Ok(())
}
