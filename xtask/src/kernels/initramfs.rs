//! The guest's initramfs: a static busybox, the modules that mount the host's root
//! (virtio_pci, 9pnet_virtio, 9p, overlay and their dependencies, in load order), and an
//! `/init` that mounts the host's root read-only over virtio-9p under a tmpfs overlay,
//! mounts the kernel's own modules and the run's output folder into it, and hands over to
//! the run's script there (`switch_root`, so that the kernel's module loader, which runs
//! `/sbin/modprobe` in PID 1's root, finds the host's kmod and the guest kernel's modules).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::Kernel;

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The modules the init loads before it can mount anything of the host's.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// 9p mount tags, shared with [`super::guest`]'s `-virtfs` options.
pub const TAG_HOST_ROOT: &str = "hostroot";
pub const TAG_MODULES: &str = "modules";
pub const TAG_OUTPUT: &str = "xtaskout";

/// Where the run's output folder appears in the guest, and the script the init hands over
/// to there.
pub const GUEST_OUTPUT: &str = "/run/xtask";
pub const GUEST_SCRIPT: &str = "guest.sh";

/// Writes the initramfs for `kernel` to `out` (an uncompressed newc cpio, which every
/// kernel reads).
pub fn build(kernel: &Kernel, out: &Path) -> anyhow::Result<()> {
    let mut archive = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules",
    ] {
        archive.dir(dir);
    }
    let busybox =
        std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (busybox-static)"))?;
    // A dynamically linked busybox (Debian's `busybox`) finds no libc in the initramfs.
    if has_interpreter(&busybox) {
        bail!("{BUSYBOX} is dynamically linked: install busybox-static instead of busybox");
    }
    archive.file("bin/busybox", 0o755, &busybox);
    for (i, module) in boot_modules(kernel)?.iter().enumerate() {
        archive.file(&format!("modules/{i:02}.ko"), 0o644, &read_module(module)?);
    }
    archive.file("init", 0o755, init_script().as_bytes());
    std::fs::write(out, archive.finish()).with_context(|| format!("writing {}", out.display()))
}

/// The init: PID 1 until it hands over. A failure drops into a shell's error message and
/// powers off, so that the host sees the guest end instead of waiting for its deadline.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {{ echo "xtask-guest: init failed: $*"; echo o > /proc/sysrq-trigger; sleep 30; }}
for module in /modules/*.ko; do insmod "$module" || fail "insmod $module"; done
p9="trans=virtio,version=9p2000.L,msize=524288"
mount -t 9p -o "$p9,ro" {TAG_HOST_ROOT} /lower || fail "mounting the host's root"
mount -t tmpfs tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "mounting the overlay"
mount -t tmpfs tmpfs /newroot/run && mkdir -p /newroot{GUEST_OUTPUT}
mount -t 9p -o "$p9" {TAG_OUTPUT} /newroot{GUEST_OUTPUT} || fail "mounting the output folder"
release=$(uname -r)
mkdir -p /newroot/lib/modules/$release
mount -t 9p -o "$p9,ro" {TAG_MODULES} /newroot/lib/modules/$release || fail "mounting the modules"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh {GUEST_OUTPUT}/{GUEST_SCRIPT}
"#
    )
}

/// Whether an ELF64 binary names a program interpreter (PT_INTERP): a dynamic one.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let word = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at + len)?;
        Some(bytes.iter().rev().fold(0u64, |v, b| v << 8 | u64::from(*b)))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (word(0x20, 8), word(0x36, 2), word(0x38, 2))
    else {
        return false;
    };
    (0..phnum).any(|i| word((phoff + i * phentsize) as usize, 4) == Some(u64::from(PT_INTERP)))
}

/// The boot modules and their dependencies, in the order `modprobe` would load them.
fn boot_modules(kernel: &Kernel) -> anyhow::Result<Vec<PathBuf>> {
    let mut modules: Vec<PathBuf> = Vec::new();
    for name in BOOT_MODULES {
        let output = Command::new("modprobe")
            .arg("--dirname")
            .arg(&kernel.root)
            .args(["--set-version", &kernel.release, "--show-depends", name])
            .output()
            .context("running modprobe --show-depends (Debian's kmod)")?;
        if !output.status.success() {
            bail!(
                "modprobe --show-depends {name} for {}: {}",
                kernel.release,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        // `insmod /path/to/module.ko [params]`, or `builtin NAME` for one built in.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some("insmod")
                && let Some(path) = words.next()
                && !modules.iter().any(|m| m == Path::new(path))
            {
                modules.push(PathBuf::from(path));
            }
        }
    }
    Ok(modules)
}

/// A module's bytes, decompressed where Debian ships it compressed (6.12 and later use xz),
/// for busybox's insmod.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let decompressor = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return std::fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let output = Command::new(decompressor)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {decompressor} -dc"))?;
    if !output.status.success() {
        bail!("{decompressor} -dc {}: {}", path.display(), output.status);
    }
    Ok(output.stdout)
}

/// A newc ("070701") cpio archive, the format the kernel unpacks into its rootfs
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_000 | 0o755, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() as u32 + 1,
            0, // check
        ];
        let _ = write!(self.bytes, "070701");
        for field in fields {
            let _ = write!(self.bytes, "{field:08x}");
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_told_from_a_static_one() {
        let this = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        // Test binaries link glibc dynamically.
        assert!(has_interpreter(&this));
        if let Ok(busybox) = std::fs::read(BUSYBOX) {
            assert!(
                !has_interpreter(&busybox),
                "{BUSYBOX} should be busybox-static"
            );
        }
    }

    #[test]
    fn cpio_entries_are_newc_and_four_byte_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"abc");
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        // Header (110 bytes) + "init\0" (5) padded to 116, then 3 bytes of data padded to 4.
        assert_eq!(&bytes[110..114], b"init");
        assert_eq!(&bytes[116..119], b"abc");
        assert_eq!(&bytes[120..126], b"070701");
        // filesize of the first entry.
        assert_eq!(&bytes[54..62], b"00000003");
        assert!(bytes.len().is_multiple_of(4));
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
