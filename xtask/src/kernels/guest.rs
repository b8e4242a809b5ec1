//! Boots a kernel under QEMU with the host's root (read-only, under a tmpfs overlay) and
//! runs one script in it; the console streams to our stdout, the script's exit code comes
//! back in the output folder.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Kernel,
    initramfs::{self, GUEST_OUTPUT, GUEST_SCRIPT, TAG_HOST_ROOT, TAG_MODULES, TAG_OUTPUT},
};

/// Lines the guest's script prints to say where it stands; they start every line of ours.
pub const MARK: &str = "xtask-guest:";

/// What the run asks of the guest.
pub struct Run<'a> {
    pub kernel: &'a Kernel,
    /// A folder of ours, shared read-write with the guest (its [`GUEST_OUTPUT`]).
    pub output: PathBuf,
    /// Shell commands run in the guest, in the host's root, with the mounts a test needs.
    pub commands: String,
    /// The whole run's limit, boot included.
    pub deadline: Duration,
    /// Each console line is given to this (the test result lines are added up there).
    pub on_line: &'a mut dyn FnMut(&str),
}

/// Boots, runs, and returns the script's exit code.
pub fn run(run: Run<'_>) -> anyhow::Result<i32> {
    let Run {
        kernel,
        output,
        commands,
        deadline,
        on_line,
    } = run;
    let _ = std::fs::remove_dir_all(&output);
    std::fs::create_dir_all(&output)?;
    let initrd = output.join("initramfs.cpio");
    initramfs::build(kernel, &initrd)?;
    std::fs::write(output.join(GUEST_SCRIPT), script(&commands))?;
    let rc_file = output.join("rc");

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let share = |path: &Path, tag: &str, readonly: bool| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
            path.display(),
            if readonly { ",readonly=on" } else { "" }
        )
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
    ])
    .args(["-smp", &cpus.to_string(), "-m", "3G"])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel.vmlinuz())
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet"])
    .arg("-virtfs")
    .arg(share(Path::new("/"), TAG_HOST_ROOT, true))
    .arg("-virtfs")
    .arg(share(&kernel.modules(), TAG_MODULES, true))
    .arg("-virtfs")
    .arg(share(&output, TAG_OUTPUT, false))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (Debian's qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let (lines, console) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + deadline;
    // The firmware's and the kernel's early lines are noise; print from the guest's first.
    let mut started = false;
    loop {
        match console.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                started |= line.contains(MARK);
                if started {
                    println!("{line}");
                    on_line(line);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the guest on {} did not finish within {deadline:?}",
                    kernel.release
                );
            }
        }
    }
    let status = child.wait()?;
    let rc = std::fs::read_to_string(&rc_file).ok();
    match rc.as_deref().map(str::trim).map(str::parse::<i32>) {
        Some(Ok(rc)) => Ok(rc),
        _ => bail!(
            "the guest on {} ended ({status}) without its script's exit code",
            kernel.release
        ),
    }
}

/// The script PID 1 runs once the host's root is in place: the mounts a test expects of a
/// host (a cgroup2 mount, bpffs, devpts, /dev/net/tun), loopback up, then `commands`; its
/// exit code goes to the output folder, and the guest powers off.
fn script(commands: &str) -> String {
    format!(
        r#"mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ip link set lo up
# No udev here: /dev/net/tun appears once its module is in.
modprobe tun
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
echo "{MARK} kernel $(uname -r), $(nproc) CPUs, up in $(cut -d' ' -f1 /proc/uptime) s"
(
set -u
{commands}
)
echo $? > {GUEST_OUTPUT}/rc
sync
echo "{MARK} done after $(cut -d' ' -f1 /proc/uptime) s"
echo o > /proc/sysrq-trigger
sleep 60
"#
    )
}
