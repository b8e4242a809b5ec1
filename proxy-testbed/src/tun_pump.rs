//! Two tun devices in two namespaces, joined by a thread that copies each packet read from
//! one to the other: a point-to-point IP link with no link-layer header, which these
//! machines cannot make otherwise (no ipip, gre or wireguard modules). A tun device is
//! created in the namespace of the thread that opens it, and its descriptor works from any
//! namespace afterwards.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use super::{Netns, TestbedError};

/// `TUNSETIFF` (`_IOW('T', 202, int)`, include/uapi/linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
/// No `struct tun_pi` in front of each packet: the bytes are the IP packet.
const IFF_NO_PI: libc::c_short = 0x1000;
/// How long the pump waits for a packet before it looks at its stop flag again.
const POLL_MS: libc::c_int = 50;

/// The pump thread between two tun devices; stops and closes both devices when dropped.
pub struct TunPump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TunPump {
    /// Creates tun device `a.1` in namespace `a.0` and `b.1` in `b.0`, and starts copying
    /// packets between them. The devices are down and have no addresses yet.
    pub fn start(a: (&Netns, &str), b: (&Netns, &str)) -> Result<Self, TestbedError> {
        let open_in = |(ns, name): (&Netns, &str)| -> Result<File, TestbedError> {
            ns.run(|| open_tun(name))?
                .map_err(|source| TestbedError::Tun {
                    name: name.to_owned(),
                    source,
                })
        };
        let fds = [open_in(a)?, open_in(b)?];
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || pump(fds, &flag));
        Ok(TunPump {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TunPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_tun(name: &str) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: the name, then the flags in the union.
    let mut ifreq = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    ifreq[..bytes.len()].copy_from_slice(bytes);
    ifreq[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is large enough for.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Copies packets both ways until `stop` is set. A packet that cannot be written (the
/// other device is down) is dropped, as a wire would.
fn pump(mut fds: [File; 2], stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut polls = [
            libc::pollfd {
                fd: fds[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fds[1].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), 2, POLL_MS) };
        if ready <= 0 {
            continue;
        }
        for (from, poll) in polls.iter().enumerate() {
            if poll.revents & libc::POLLIN == 0 {
                continue;
            }
            let Ok(len) = fds[from].read(&mut buf) else {
                continue;
            };
            let _ = fds[1 - from].write(&buf[..len]);
        }
    }
}
