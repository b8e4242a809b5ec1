//! Builds the eBPF classifier (`proxy-ebpf`) for `bpfel-unknown-none` and leaves the object
//! in `OUT_DIR`, where `src/ebpf.rs` embeds it: `cargo build -p proxy` alone gives a
//! self-contained binary, as in aya-template.
//!
//! The eBPF crate needs `-Z build-std=core`, so it builds with the nightly toolchain when
//! rustup has one, or else with the current toolchain and `RUSTC_BOOTSTRAP=1` (both need the
//! `rust-src` component; `cargo xtask` and `.ci/run` install it, with `bpf-linker`).
//!
//! aya-build forwards every line of the nested cargo's output as `cargo:warning=`, so a
//! fresh build would print dozens of `warning: proxy@...: Compiling ...` lines that are not
//! warnings. They are held back here ([`quiet`]) and shown only when the eBPF build fails,
//! or with `PROXY_EBPF_BUILD_VERBOSE=1`.

use std::process::Command;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

const VERBOSE: &str = "PROXY_EBPF_BUILD_VERBOSE";

fn nightly_available() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed={VERBOSE}");
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
    let build = || aya_build::build_ebpf([package], toolchain);
    let verbose = std::env::var_os(VERBOSE).is_some_and(|v| v != "0");
    let result = if verbose { build() } else { quiet(build)? };
    result.context(
        "building the eBPF classifier (is bpf-linker installed? run `cargo xtask build-ebpf`; \
         its output is above)",
    )
}

/// Runs `build` with this process's stdout (where build scripts talk to cargo) sent to a
/// file, then passes every `cargo:` directive on except the forwarded output lines
/// (`cargo:warning=`). When `build` fails, those lines go to stderr, which cargo shows for a
/// failed build script.
fn quiet<T>(build: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<anyhow::Result<T>> {
    use std::{
        fs::File,
        io::{Read as _, Seek as _, Write as _},
        os::fd::AsRawFd as _,
    };

    let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
    let path = std::path::Path::new(&out_dir).join("ebpf-build-output.txt");
    let mut captured = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::stdout().flush().context("flushing stdout")?;
    // SAFETY: plain descriptor calls on descriptors this process owns. Only aya-build
    // writes to stdout while it points at the file; it joins its output thread before
    // returning Ok (after a failure, lines that thread writes late reach cargo directly,
    // shown as warnings, which is what a failure should show anyway).
    let saved = unsafe { libc::dup(1) };
    anyhow::ensure!(
        saved >= 0,
        "dup(stdout): {}",
        std::io::Error::last_os_error()
    );
    anyhow::ensure!(
        unsafe { libc::dup2(captured.as_raw_fd(), 1) } >= 0,
        "dup2(stdout): {}",
        std::io::Error::last_os_error()
    );
    let result = build();
    let flushed = std::io::stdout().flush();
    let restored = unsafe { libc::dup2(saved, 1) };
    unsafe { libc::close(saved) };
    anyhow::ensure!(
        restored >= 0,
        "restoring stdout: {}",
        std::io::Error::last_os_error()
    );
    flushed.context("flushing the captured output")?;

    let mut text = String::new();
    captured.rewind().context("rewinding the captured output")?;
    captured
        .read_to_string(&mut text)
        .context("reading the captured output")?;
    let mut forwarded = Vec::new();
    for line in text.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(output) => forwarded.push(output),
            None => println!("{line}"),
        }
    }
    if result.is_err() {
        eprintln!("{}", forwarded.join("\n"));
    } else {
        // rustc's own warnings about the eBPF crate are worth one line.
        let warnings = forwarded
            .iter()
            .filter(|line| line.starts_with("warning:") && !line.contains("generated"))
            .count();
        if warnings > 0 {
            println!(
                "cargo:warning=the eBPF crate built with {warnings} compiler warning(s); \
                 {VERBOSE}=1 shows them"
            );
        }
    }
    Ok(result)
}
