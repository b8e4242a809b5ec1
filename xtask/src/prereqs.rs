//! Installing what the build and the tests need, when it is missing.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// bpf-linker 0.10.3 is the last release that links with the Rust toolchain's own LLVM;
/// later ones need a system LLVM 23, which Debian 12 does not ship.
const BPF_LINKER_VERSION: &str = "0.10.3";

/// Debian packages: iproute2 for the test topologies (and `ss`), bpftool to inspect
/// links, iptables and nftables for the kernel-TPROXY comparisons, HAProxy as the bench's
/// peer (its set-up (d)), microsocks and Dante as real SOCKS5 upstreams (Dante for UDP
/// ASSOCIATE), systemd for `systemd-analyze verify` of `dist/systemd/proxy.service`,
/// systemd-container (systemd-nspawn) and debootstrap to boot that unit under a real
/// systemd ([`ensure_systemd_root`], `proxy/tests/systemd.rs`); QEMU, a static busybox and
/// kmod (`depmod`, `modprobe`, also the guest's module loader) and xz for the stock kernels
/// of `--kernel` ([`crate::kernels`]).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
    ("microsocks", "microsocks"),
    ("danted", "dante-server"),
    ("systemd-analyze", "systemd"),
    ("systemd-nspawn", "systemd-container"),
    ("debootstrap", "debootstrap"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("depmod", "kmod"),
    ("modprobe", "kmod"),
    ("xz", "xz-utils"),
];

/// The Kubernetes schema validator for `dist/kubernetes/`, from PyPI, with the API's
/// schemas inside (no network when it runs), into a virtual environment of its own.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Where [`ensure_dist_validators`] puts it, under the workspace's `target/`; its `bin` is
/// where `proxy/tests/dist.rs` looks.
pub const DIST_VALIDATORS: &str = "target/dist-validators";

/// The Debian root that `proxy/tests/systemd.rs` boots with systemd-nspawn, under the
/// workspace's `target/`, named by what it holds: change the name when the suite or the
/// packages change, and the next `cargo xtask test` builds the new one (the test names the
/// same directory).
pub const SYSTEMD_ROOT: &str = "target/systemd-root/bookworm-1";

/// What the root holds beyond debootstrap's minimal base: systemd as init, D-Bus for
/// `systemctl`, iproute2.
const SYSTEMD_ROOT_PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2";

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// The toolchain that builds the eBPF crate, chosen as `proxy/build.rs` chooses it (the two
/// are separate crates, so the rule is written in both): PROXY_EBPF_TOOLCHAIN when set,
/// else nightly when rustup has it, else stable with `RUSTC_BOOTSTRAP=1`.
pub fn ebpf_toolchain() -> String {
    if let Ok(chosen) = std::env::var("PROXY_EBPF_TOOLCHAIN") {
        return chosen;
    }
    if succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        "nightly".into()
    } else {
        "stable".into()
    }
}

/// `-Z build-std=core` needs the standard library's sources.
pub fn ensure_rust_src() -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain();
    let out = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &toolchain,
        ])
        .output()
        .context("running rustup (the eBPF build needs a rustup-managed toolchain)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the rust-src component for the {toolchain} toolchain (needed by -Z build-std=core)"
    );
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &toolchain]))
}

pub fn ensure_bpf_linker() -> anyhow::Result<()> {
    if which::which("bpf-linker").is_ok() {
        return Ok(());
    }
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into_os_string()))
    {
        let installed = Path::new(&home).join("bin/bpf-linker");
        if installed.exists() {
            // Installed but not on PATH: put cargo's bin directory there for the build.
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs: Vec<_> = std::env::split_paths(&path).collect();
            dirs.insert(0, Path::new(&home).join("bin"));
            let joined = std::env::join_paths(dirs).context("building PATH")?;
            // SAFETY: xtask is single-threaded here.
            unsafe { std::env::set_var("PATH", joined) };
            return Ok(());
        }
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object; takes about a minute)"
    );
    status(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
    ]))
}

/// Everything `cargo build -p proxy` needs.
pub fn ensure_build() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// Debian packages the demo and the tests use, installed with apt-get when missing.
pub fn ensure_system_tools() -> anyhow::Result<()> {
    // (program, package) pairs whose program is not installed (root's PATH has /usr/sbin,
    // a plain user's may not).
    let missing = || -> Vec<(&str, &str)> {
        DEBIAN_PACKAGES
            .iter()
            .filter(|(bin, _)| {
                which::which(bin).is_err() && !Path::new("/usr/sbin").join(bin).exists()
            })
            .copied()
            .collect()
    };
    let mut packages: Vec<&str> = missing().iter().map(|(_, pkg)| *pkg).collect();
    packages.dedup();
    if packages.is_empty() {
        return Ok(());
    }
    if which::which("apt-get").is_err() {
        bail!("missing tools from packages {packages:?}; install them with your package manager");
    }
    eprintln!("xtask: installing Debian packages {packages:?} with apt-get");
    status(Command::new("apt-get").args(["update", "-q"]))?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    if let Err(e) = status(&mut install) {
        // A package whose service cannot start here (no init system) makes apt-get fail
        // after unpacking; what matters is that the programs are there.
        eprintln!("xtask: {e}; checking the programs");
    }
    let still_missing: Vec<&str> = missing().iter().map(|(bin, _)| *bin).collect();
    if !still_missing.is_empty() {
        bail!("still missing after apt-get: {still_missing:?}");
    }
    for (_, service) in PACKAGE_SERVICES
        .iter()
        .filter(|(package, _)| packages.contains(package))
    {
        stop_packaged_service(service);
    }
    Ok(())
}

/// (package, service) pairs: services that Debian's packages start on install and that
/// nothing here wants running. The bench starts its own HAProxy in a namespace; a packaged
/// one would hold the host's resources (and, once configured, its ports) for nothing.
const PACKAGE_SERVICES: &[(&str, &str)] = &[("haproxy", "haproxy")];

/// Stops `service` and keeps it from starting at boot, by whichever init system runs; a
/// failure is reported, not fatal (with no init system, nothing was started).
fn stop_packaged_service(service: &str) {
    let stopped = if Path::new("/run/systemd/system").exists() {
        status(Command::new("systemctl").args(["disable", "--now", service]))
    } else if which::which("update-rc.d").is_ok() || Path::new("/usr/sbin/update-rc.d").exists() {
        let _ = status(Command::new("update-rc.d").args([service, "disable"]));
        status(Command::new("invoke-rc.d").args([service, "stop"]))
    } else {
        Ok(())
    };
    if let Err(e) = stopped {
        eprintln!("xtask: stopping the packaged {service} service: {e}");
    }
}

/// `kubernetes-validate` in [`DIST_VALIDATORS`] (a Python virtual environment), when it is
/// not there yet. `systemd-analyze` comes with the Debian packages.
pub fn ensure_dist_validators(workspace: &Path) -> anyhow::Result<()> {
    let venv = workspace.join(DIST_VALIDATORS);
    if venv.join("bin/kubernetes-validate").exists() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {KUBERNETES_VALIDATE} into {}",
        venv.display()
    );
    if !succeeds(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
        // Debian's python3 has venv in a package of its own.
        status(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "python3-venv",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(KUBERNETES_VALIDATE),
    )
}

/// [`SYSTEMD_ROOT`], when it is not there yet: debootstrap of bookworm from the Debian
/// archive apt uses here (`PROXY_DEBIAN_MIRROR` names another), about 250 MB and under a
/// minute on a good link. Built beside its final name and renamed when complete, so a build cut
/// short is never taken for the cached root.
pub fn ensure_systemd_root(workspace: &Path) -> anyhow::Result<std::path::PathBuf> {
    let root = workspace.join(SYSTEMD_ROOT);
    if root.is_dir() {
        return Ok(root);
    }
    let partial = root.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    if let Some(parent) = root.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // The mirror apt is set up with here (debootstrap's own default otherwise).
    let mirror = debian_mirror();
    eprintln!(
        "xtask: building the Debian root for the systemd test in {} (debootstrap from {})",
        root.display(),
        mirror.as_deref().unwrap_or("debootstrap's default mirror")
    );
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .args([
            "--variant=minbase",
            &format!("--include={SYSTEMD_ROOT_PACKAGES}"),
            "bookworm",
        ])
        .arg(&partial);
    if let Some(mirror) = &mirror {
        debootstrap.arg(mirror);
    }
    status(&mut debootstrap)?;
    std::fs::rename(&partial, &root)
        .with_context(|| format!("renaming {} to {}", partial.display(), root.display()))?;
    Ok(root)
}

/// The Debian archive to fetch from: `PROXY_DEBIAN_MIRROR`, else the first one apt is set
/// up with here.
pub fn debian_mirror() -> Option<String> {
    std::env::var("PROXY_DEBIAN_MIRROR")
        .ok()
        .or_else(apt_mirror)
}

/// The first Debian archive apt is set up with here.
fn apt_mirror() -> Option<String> {
    let mut texts: Vec<String> = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "sources"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list").ok());
    debian_mirror_in(&texts)
}

/// The first Debian archive in apt sources: a `URIs:` line of a deb822 `.sources` file, or
/// a `deb` line of `sources.list`.
fn debian_mirror_in(texts: &[String]) -> Option<String> {
    texts.iter().flat_map(|t| t.lines()).find_map(|line| {
        let line = line.trim();
        let uri = match (line.strip_prefix("URIs:"), line.strip_prefix("deb ")) {
            (Some(rest), _) => rest.split_whitespace().next(),
            (None, Some(rest)) => rest.split_whitespace().find(|w| w.contains("://")),
            (None, None) => None,
        }?;
        uri.ends_with("/debian").then(|| uri.to_owned())
    })
}

/// The demo and the kernel tests create namespaces and load eBPF programs.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!(
            "{what} needs root (network namespaces, eBPF, routing): run it as root, for example with sudo -E"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_debian_mirror_comes_from_either_sources_format() {
        let deb822 =
            "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm\n";
        let security = "Types: deb\nURIs: http://mirror.invalid/debian-security\n";
        let list = "# old style\ndeb [arch=amd64] http://other.invalid/debian bookworm main\n";
        assert_eq!(
            debian_mirror_in(&[security.into(), deb822.into()]),
            Some("http://mirror.invalid/debian".into())
        );
        assert_eq!(
            debian_mirror_in(&[list.into()]),
            Some("http://other.invalid/debian".into())
        );
        assert_eq!(
            debian_mirror_in(&["deb-src http://x.invalid/debian".into()]),
            None
        );
    }
}
