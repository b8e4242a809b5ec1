//! A TCP socket's byte counters from `TCP_INFO` (linux/tcp.h): what the in-kernel relay
//! uses to tell when a direction's bytes are all written, and what the idle timeout of
//! both relays watches (a byte either way moves one of them, whoever moved it).

use std::os::fd::RawFd;

/// The start of `struct tcp_info` (linux/tcp.h) up to the byte counters.
#[repr(C)]
#[derive(Default)]
struct TcpInfoHead {
    bytes8: [u8; 8],
    words: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

/// `tcpi_bytes_acked` and `tcpi_bytes_received`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Bytes the peer acknowledged (written by this side and delivered).
    pub acked: u64,
    /// Bytes received from the peer, up to `rcv_nxt` (a FIN counts one).
    pub received: u64,
}

pub(crate) fn counters(fd: RawFd) -> std::io::Result<Counters> {
    let mut info = TcpInfoHead::default();
    let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
    // SAFETY: a valid descriptor and an out-buffer of the size given; the kernel copies at
    // most that much.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    os_result(rc)?;
    if (len as usize) < std::mem::size_of::<TcpInfoHead>() {
        return Err(std::io::Error::other(
            "TCP_INFO without byte counters (kernel older than 4.1)",
        ));
    }
    Ok(Counters {
        acked: info.bytes_acked,
        received: info.bytes_received,
    })
}

/// A libc call's return code as a result (-1: errno).
pub(crate) fn os_result(rc: libc::c_int) -> std::io::Result<()> {
    nix::errno::Errno::result(rc)
        .map(drop)
        .map_err(std::io::Error::from)
}
