//! `cargo xtask test --kernel VERSION`: the kernel tests on the stock kernels users run,
//! booted under QEMU on this machine.
//!
//! - [`MATRIX`] names the kernels and where Debian publishes them; [`fetch`] downloads and
//!   unpacks one (newest build of its series) into `target/kernels/`, through a private apt
//!   configuration, touching nothing of the host's (no /boot, no dpkg database).
//! - [`initramfs`] builds the guest's init, which mounts the host's root read-only under a
//!   tmpfs overlay, so that the test binaries built here run there as they are.
//! - [`guest`] boots it and runs a script, streaming the console.
//!
//! Facts this rests on (`../shared/DESIGN.md` section 8): /dev/kvm here is a paravirtualised
//! nested hypervisor that cannot run a stock kernel, so QEMU emulates (TCG), which boots a
//! Debian kernel in about 10 s and runs the tests several times slower than the host.

pub mod guest;
pub mod initramfs;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// A series of stock kernels: Debian's unsigned image package for it, from these suites.
pub struct KernelSeries {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// Who runs it.
    pub distribution: &'static str,
    /// The package name around the build number: `{prefix}N{suffix}`.
    prefix: &'static str,
    suffix: &'static str,
    /// The archive (`debian` or `debian-security`) and suite of each place to look.
    suites: &'static [(&'static str, &'static str)],
}

/// The kernels `--kernel all` runs: Debian 11, 12, and 12's security updates, which carry
/// Debian 13's series.
pub const MATRIX: &[KernelSeries] = &[
    KernelSeries {
        name: "5.10",
        distribution: "Debian 11",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
        suites: &[
            ("debian", "bullseye"),
            ("debian-security", "bullseye-security"),
        ],
    },
    KernelSeries {
        name: "6.1",
        distribution: "Debian 12",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
        suites: &[
            ("debian", "bookworm"),
            ("debian-security", "bookworm-security"),
        ],
    },
    KernelSeries {
        name: "6.12",
        distribution: "Debian 13 (from Debian 12's security suite)",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
        suites: &[("debian-security", "bookworm-security")],
    },
];

/// The series `--kernel` names: one, several separated by commas, or `all`.
pub fn select(names: &str) -> anyhow::Result<Vec<&'static KernelSeries>> {
    if names == "all" {
        return Ok(MATRIX.iter().collect());
    }
    names
        .split(',')
        .map(|name| {
            MATRIX.iter().find(|k| k.name == name).with_context(|| {
                format!(
                    "--kernel {name}: not in the matrix; one of {}, several separated by commas, or all",
                    MATRIX.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect()
}

/// One unpacked kernel.
pub struct Kernel {
    /// What `uname -r` says in it, and its modules' folder name.
    pub release: String,
    /// The unpacked package: `boot/vmlinuz-RELEASE`, `lib/modules/RELEASE`.
    pub root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    pub fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The newest build of `series`, downloaded and unpacked under `cache` once (then reused,
/// and used as it is when the archive cannot be reached).
pub fn fetch(series: &KernelSeries, cache: &Path) -> anyhow::Result<Kernel> {
    let apt = Apt::new(&cache.join("apt"))?;
    let package = match apt.update().and_then(|()| apt.newest(series)) {
        Ok(package) => package,
        Err(e) => match newest_cached(series, cache) {
            Some(package) => {
                eprintln!("xtask: {e:#}; using the cached {package}");
                package
            }
            None => return Err(e),
        },
    };
    let release = package
        .strip_prefix("linux-image-")
        .and_then(|p| p.strip_suffix("-unsigned"))
        .context("the package name")?
        .to_owned();
    let root = cache.join(&package);
    let kernel = Kernel { release, root };
    let ready = kernel.root.join(".ready");
    if ready.exists() {
        return Ok(kernel);
    }
    eprintln!("xtask: fetching {package} ({})", series.distribution);
    let download = cache.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    apt.download(&package, &download)?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let _ = std::fs::remove_dir_all(&kernel.root);
    crate::prereqs::status(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&kernel.root),
    )?;
    // The package's postinst would make modules.dep; nothing is installed, so do it here.
    crate::prereqs::status(
        Command::new("depmod")
            .arg("-b")
            .arg(&kernel.root)
            .arg(&kernel.release),
    )?;
    if !kernel.vmlinuz().exists() {
        bail!("{package} has no {}", kernel.vmlinuz().display());
    }
    std::fs::write(&ready, "")?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(kernel)
}

/// The build number of `package` in `series`, if it is one of its packages.
fn build_number(series: &KernelSeries, package: &str) -> Option<u32> {
    package
        .strip_prefix(series.prefix)?
        .strip_suffix(series.suffix)?
        .parse()
        .ok()
}

/// The newest package of `series` unpacked under `cache` by an earlier run.
fn newest_cached(series: &KernelSeries, cache: &Path) -> Option<String> {
    std::fs::read_dir(cache)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().join(".ready").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| build_number(series, &name).map(|n| (n, name)))
        .max()
        .map(|(_, name)| name)
}

/// apt with a configuration of its own: its sources list, package lists and cache under
/// `dir`, no dpkg status (nothing here is installed).
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> anyhow::Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mirror = crate::prereqs::debian_mirror()
            .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
        let mut sources = String::new();
        for series in MATRIX {
            for (archive, suite) in series.suites {
                let base = match *archive {
                    "debian-security" => format!("{mirror}-security"),
                    _ => mirror.clone(),
                };
                let line = format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {base} {suite} main\n"
                );
                if !sources.contains(&line) {
                    sources.push_str(&line);
                }
            }
        }
        std::fs::write(dir.join("sources.list"), sources)?;
        Ok(Apt {
            dir: dir.to_owned(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let option = |key: &str, value: &Path| format!("-o{key}={}", value.display());
        cmd.arg(option(
            "Dir::Etc::SourceList",
            &self.dir.join("sources.list"),
        ))
        .arg("-oDir::Etc::SourceParts=/dev/null")
        .arg(option("Dir::State::Lists", &self.dir.join("lists")))
        .arg(option("Dir::Cache", &self.dir.join("cache")))
        .arg("-oDir::State::Status=/dev/null")
        .arg("-oAPT::Architecture=amd64")
        .arg("-qq");
        cmd
    }

    fn update(&self) -> anyhow::Result<()> {
        crate::prereqs::status(self.command("apt-get").arg("update"))
            .context("apt-get update (a private configuration under target/kernels)")
    }

    /// The newest package of `series` the archive has.
    fn newest(&self, series: &KernelSeries) -> anyhow::Result<String> {
        let output = self
            .command("apt-cache")
            .args(["pkgnames", series.prefix])
            .output()
            .context("running apt-cache pkgnames")?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|name| build_number(series, name).map(|n| (n, name.to_owned())))
            .max()
            .map(|(_, name)| name)
            .with_context(|| {
                format!(
                    "no {}N{} package in the archive",
                    series.prefix, series.suffix
                )
            })
    }

    fn download(&self, package: &str, into: &Path) -> anyhow::Result<()> {
        // As root, apt downloads as `_apt`, which cannot write to our folder: it says so
        // and downloads as root.
        crate::prereqs::status(
            self.command("apt-get")
                .args(["download", package])
                .current_dir(into),
        )
        .with_context(|| format!("apt-get download {package}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_numbers_are_read_from_each_series_names() {
        let s510 = &MATRIX[0];
        let s612 = &MATRIX[2];
        assert_eq!(
            build_number(s510, "linux-image-5.10.0-46-amd64-unsigned"),
            Some(46)
        );
        assert_eq!(
            build_number(s510, "linux-image-5.10.0-46-rt-amd64-unsigned"),
            None
        );
        assert_eq!(
            build_number(s510, "linux-image-5.10.0-46-cloud-amd64-unsigned"),
            None
        );
        assert_eq!(
            build_number(s612, "linux-image-6.12.118+deb12-amd64-unsigned"),
            Some(118)
        );
        assert!(select("5.10").is_ok());
        assert_eq!(select("all").expect("all").len(), MATRIX.len());
        assert!(select("4.19").is_err());
        let two: Vec<&str> = select("5.10,6.1")
            .expect("two")
            .iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(two, ["5.10", "6.1"]);
    }
}
