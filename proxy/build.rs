//! Builds the eBPF classifier (`proxy-ebpf`) for `bpfel-unknown-none` and leaves the object
//! in `OUT_DIR`, where `src/ebpf.rs` embeds it: `cargo build -p proxy` alone gives a
//! self-contained binary, as in aya-template.
//!
//! The eBPF crate needs `-Z build-std=core`, so it builds with the nightly toolchain when
//! rustup has one, or else with the current toolchain and `RUSTC_BOOTSTRAP=1` (both need the
//! `rust-src` component; `cargo xtask` and `.ci/run` install it, with `bpf-linker`).

use std::process::Command;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn nightly_available() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_TOOLCHAIN");
    let chosen = std::env::var("PROXY_EBPF_TOOLCHAIN").ok();
    let toolchain = match chosen.as_deref() {
        Some(name) => Toolchain::Custom(name),
        None if nightly_available() => Toolchain::Nightly,
        None => {
            // SAFETY: the build script is single-threaded here.
            unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
            Toolchain::Custom("stable")
        }
    };
    let package = Package {
        name: "proxy-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], toolchain).context(
        "building the eBPF classifier (is bpf-linker installed? run `cargo xtask build-ebpf`)",
    )
}
