//! Many datagrams per system call on a UDP session's sockets.
//!
//! With one `recvmsg` and one `send` per datagram, the agent spent 11-15 µs of CPU on each
//! 1,200-byte datagram of a flat-out flow and dropped most of them at its socket; in
//! batches it spends 5-7 µs, most of it in the kernel: the copies, and the delivery of what
//! it sends (measured with `iperf3 -u` through the testbed's gateway on 2 CPUs). A session
//! passes datagrams on in batches:
//!
//! * `recvmmsg(2)` takes up to [`BATCH`] messages in one call. With `UDP_GRO` on the socket
//!   (udp(7), Linux 5.0) one message may be a *train* of datagrams that the kernel kept
//!   together: coalesced on receive by `udp_gro_receive`, or a GSO packet that a local
//!   sender made with `UDP_SEGMENT`, which `udp_queue_rcv_skb` hands whole to such a socket
//!   instead of cutting it up in `udp_rcv_segment`. The `UDP_GRO` control message gives the
//!   size of its datagrams; all but the last have it, the last may be shorter.
//! * `sendmmsg(2)` sends what one receive brought in one call. With `UDP_SEGMENT` (Linux
//!   4.18) a run of equal-sized datagrams, the last possibly shorter, is one message: it
//!   crosses the stack as one packet (`udp_send_skb` sets its `gso_size`) and is cut into
//!   datagrams as late as possible (`__udp_gso_segment`, in software or by the NIC), or not
//!   at all when the receiver takes GRO trains. Where the kernel refuses it on a path (no
//!   checksum offload on the device, IPsec: `-EIO`; a datagram larger than the path MTU:
//!   `-EMSGSIZE`), the same datagrams go again one message each, and the socket stops
//!   trying: no datagram is dropped for it.
//!
//! A datagram that needs a header of its own (SOCKS5 framing) is always one message: GSO
//! would put the header in front of the first datagram of a run only.
//!
//! Memory: the datagrams live in this thread's scratch ([`Batch`], [`BATCH`] slots of 64 KiB
//! each, room for any datagram or train, of which only the pages written to become
//! resident: [`Pages`]); a session owns none. Only datagrams that a full send buffer
//! refuses are copied, at their own size, for the caller to send when there is room.

use std::{cell::RefCell, io, ops::Range, os::fd::AsRawFd as _};

use log::debug;
use nix::sys::socket::{self, sockopt};
use tokio::{io::Interest, net::UdpSocket};

/// Messages taken by one `recvmmsg`.
pub const BATCH: usize = 32;
/// Room for one message: the largest datagram, or the largest GRO train (the kernel keeps
/// a train under 64 KiB, like any skb it builds by GRO).
const SLOT: usize = 64 * 1024;
/// Datagrams in one GSO message: `UDP_MAX_SEGMENTS`, 64 since `UDP_SEGMENT` came (later
/// kernels allow more); `udp_send_skb` refuses more with `-EINVAL`.
const MAX_SEGMENTS: usize = 64;
/// Payload bytes in one GSO message: the whole packet must fit an IP length field
/// (`__ip_append_data` refuses more than 0xFFFF with its headers: 20 + 8 bytes for IPv4).
const MAX_GSO_PAYLOAD: usize = 65_507;
/// Messages handed to one `sendmmsg` (well below `UIO_MAXIOV`).
const SEND_MESSAGES: usize = 64;

/// Control message room for the receive side: a `UDP_GRO` message (`CMSG_SPACE(4)`, 24
/// bytes), the only one asked for on these sockets, with room to spare. `u64` gives the
/// alignment `cmsghdr` needs.
type RecvControl = [u64; 8];
/// Control message room for one `UDP_SEGMENT` message (`CMSG_SPACE(2)`, 24 bytes).
type SendControl = [u64; 3];

/// What goes in front of each datagram sent.
#[derive(Clone, Copy)]
pub enum Framing<'a> {
    /// Nothing: the datagram as it came.
    Plain,
    /// A header of its own in front of each datagram (SOCKS5 UDP).
    Prefixed(&'a [u8]),
}

/// Whether sends on a socket may use `UDP_SEGMENT`: the kernel offers it, and it has not
/// failed on this socket's path.
pub struct Gso {
    enabled: bool,
}

impl Gso {
    /// On where the kernel offers it.
    pub fn new() -> Self {
        Gso {
            enabled: gso_offered(),
        }
    }
}

/// Whether the kernel takes `UDP_SEGMENT` (Linux 4.18). Asked once, with the socket option:
/// a kernel without it would not refuse the control message but ignore it
/// (`ip_cmsg_send` skips levels other than `SOL_IP`), and send a run as one large datagram.
fn gso_offered() -> bool {
    static OFFERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFFERED.get_or_init(|| {
        let probe = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
            socket::setsockopt(&s, sockopt::UdpGsoSegment, &1200).map_err(Into::into)
        });
        if let Err(e) = &probe {
            debug!("udp: no UDP_SEGMENT here ({e}), one datagram per message");
        }
        probe.is_ok()
    })
}

/// The receive queue a session socket may hold, in payload bytes (the kernel doubles it
/// for its bookkeeping, socket(7)): about 1,700 datagrams of 1,200 bytes.
const RECEIVE_QUEUE: usize = 2 * 1024 * 1024;

/// Readies a session socket for batches: GRO trains (`UDP_GRO`; where the kernel lacks it,
/// before 5.0, the socket gets one datagram per message, which is handled the same), and a
/// receive queue deep enough to hold what a sender sends while this thread waits for a
/// CPU. With the default (`rmem_default`, 208 KiB: 90 datagrams of 1,200 bytes, 1 ms of a
/// fast sender) most of what a flat-out sender sent was dropped at the socket
/// (`UdpRcvbufErrors`) whenever the machine was busy. The size is a limit, not an
/// allocation: the kernel charges datagrams as they queue, so an idle session costs
/// nothing, and `net.ipv4.udp_mem` bounds all UDP sockets together. `SO_RCVBUFFORCE`
/// (the agent keeps CAP_NET_ADMIN) goes past `net.core.rmem_max`; without it, as much as
/// `SO_RCVBUF` allows.
pub fn prepare(socket: &UdpSocket) {
    if let Err(e) = socket::setsockopt(socket, sockopt::UdpGroSegment, &true) {
        debug!("udp: UDP_GRO refused ({e}), one datagram per message");
    }
    if socket::setsockopt(socket, sockopt::RcvBufForce, &RECEIVE_QUEUE).is_err()
        && let Err(e) = socket::setsockopt(socket, sockopt::RcvBuf, &RECEIVE_QUEUE)
    {
        debug!("udp: SO_RCVBUF refused ({e}), the default receive queue");
    }
}

thread_local! {
    /// The scratch of the sessions of this thread: borrowed from a receive to the sends of
    /// what it brought, never across an await.
    static SCRATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Receives what is waiting on `from` (up to [`BATCH`] messages) and sends it on `to` at
/// once. `payload` tells which part of each datagram to pass on (`None`: drop it, for a
/// malformed SOCKS5 frame); `sent` is told the size of each datagram that went. Returns
/// copies of the datagrams that `to`'s full send buffer refused, in order, for the caller
/// to send when there is room. A receive that finds nothing (`WouldBlock`) returns nothing; any other error is
/// returned as it is, after what could be sent was.
pub fn relay(
    from: &UdpSocket,
    payload: impl Fn(&[u8]) -> Option<Range<usize>>,
    to: &UdpSocket,
    framing: Framing<'_>,
    gso: &mut Gso,
    mut sent: impl FnMut(usize),
) -> io::Result<Vec<Vec<u8>>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let batch = match scratch {
            Some(batch) => batch,
            None => scratch.insert(Batch::new().map_err(|e| {
                io::Error::new(e.kind(), format!("mapping the UDP batch scratch: {e}"))
            })?),
        };
        match from.try_io(Interest::READABLE, || {
            batch.recv(from.as_raw_fd(), &payload)
        }) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let done = batch.send(to, framing, gso, &mut sent)?;
        Ok(batch.copies_from(done))
    })
}

/// A thread's receive buffer, the datagrams found in it, and the system calls' headers.
struct Batch {
    /// [`BATCH`] slots of [`SLOT`] bytes.
    buf: Pages,
    /// The part of each received datagram to pass on, as a range of `buf`, in order.
    datagrams: Vec<Range<usize>>,
    /// Headers, buffers and control messages of the system calls: kept to save an
    /// allocation per call; they point into `buf` and `datagrams`' data only during a call.
    recv_iov: Vec<libc::iovec>,
    recv_headers: Vec<libc::mmsghdr>,
    recv_control: Vec<RecvControl>,
    send_iov: Vec<libc::iovec>,
    send_headers: Vec<libc::mmsghdr>,
    send_control: Vec<SendControl>,
    /// The datagrams of each message of the next `sendmmsg`.
    send_runs: Vec<Run>,
}

/// Datagrams sent as one message: `count` of them, from one of `segment` bytes on (a GSO
/// run when `count` > 1).
struct Run {
    count: usize,
    segment: usize,
}

/// Anonymous memory straight from `mmap(2)`: a page becomes resident only once written
/// (until then it reads as zeroes), whatever state the allocator is in. From `calloc`, the
/// scratch could come out of an arena that had to zero it (glibc serves large blocks from
/// its arenas once a larger one was freed, raising its mmap threshold), which made the
/// whole scratch of each runtime thread resident at its first datagram: 4 KiB more per
/// session in the flood test.
struct Pages {
    start: std::ptr::NonNull<u8>,
    len: usize,
}

impl Pages {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a new private anonymous mapping, at an address the kernel picks: no
        // existing memory is affected.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = std::ptr::NonNull::new(start.cast())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Pages { start, len })
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.start.as_ptr()
    }
}

impl std::ops::Deref for Pages {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes mapped at `start` for as long as `self` lives;
        // written only by the kernel during a call that holds `&mut self`.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.start.as_ptr().cast(), self.len) };
    }
}

/// An all-zero `mmsghdr`: no name, no buffers, no control messages.
fn empty_header() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct of integers and raw pointers, for which all
    // zeroes is a valid value (null pointers, zero lengths); some libcs give it private
    // padding fields, so it cannot be built field by field.
    unsafe { std::mem::zeroed() }
}

impl Batch {
    fn new() -> io::Result<Self> {
        Ok(Batch {
            buf: Pages::new(BATCH * SLOT)?,
            datagrams: Vec::with_capacity(BATCH),
            recv_iov: Vec::with_capacity(BATCH),
            recv_headers: Vec::with_capacity(BATCH),
            recv_control: vec![[0; 8]; BATCH],
            send_iov: Vec::with_capacity(2 * SEND_MESSAGES),
            send_headers: Vec::with_capacity(SEND_MESSAGES),
            send_control: vec![[0; 3]; SEND_MESSAGES],
            send_runs: Vec::with_capacity(SEND_MESSAGES),
        })
    }

    /// One `recvmmsg` into the slots; fills `datagrams` with what `payload` keeps of each
    /// datagram, trains cut at their segment size.
    fn recv(
        &mut self,
        fd: i32,
        payload: &impl Fn(&[u8]) -> Option<Range<usize>>,
    ) -> io::Result<()> {
        self.datagrams.clear();
        self.recv_iov.clear();
        self.recv_headers.clear();
        let base = self.buf.as_mut_ptr();
        for slot in 0..BATCH {
            self.recv_iov.push(libc::iovec {
                // SAFETY: slot * SLOT + SLOT <= buf.len(): inside the allocation.
                iov_base: unsafe { base.add(slot * SLOT) }.cast(),
                iov_len: SLOT,
            });
        }
        // No more pushes to recv_iov below: the pointers to its elements stay valid.
        for (iov, control) in self.recv_iov.iter_mut().zip(&mut self.recv_control) {
            let mut header = empty_header();
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = control.as_mut_ptr().cast();
            header.msg_hdr.msg_controllen = size_of::<RecvControl>() as _;
            self.recv_headers.push(header);
        }
        // SAFETY: recv_headers holds BATCH headers, each pointing to one iovec of a slot
        // of `buf` and to a control buffer of its own, all alive and not otherwise
        // borrowed for the duration of the call; no timeout pointer.
        let received = unsafe {
            libc::recvmmsg(
                fd,
                self.recv_headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let received = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
        for (slot, header) in self.recv_headers[..received].iter().enumerate() {
            let len = header.msg_len as usize;
            if header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                // Cannot happen with 64 KiB slots; never pass on a cut datagram.
                debug!("udp: a {len}-byte message did not fit its slot, dropped");
                continue;
            }
            let start = slot * SLOT;
            for range in segments(len, gro_segment(&header.msg_hdr)) {
                let datagram = start + range.start..start + range.end;
                if let Some(keep) = payload(&self.buf[datagram.clone()]) {
                    self.datagrams
                        .push(datagram.start + keep.start..datagram.start + keep.end);
                }
            }
        }
        Ok(())
    }

    /// Sends `datagrams` on `to` with as few messages and calls as it can; returns how many
    /// went before the send buffer was full (all of them, usually).
    fn send(
        &mut self,
        to: &UdpSocket,
        framing: Framing<'_>,
        gso: &mut Gso,
        sent: &mut impl FnMut(usize),
    ) -> io::Result<usize> {
        let mut done = 0;
        while done < self.datagrams.len() {
            let use_gso = gso.enabled && matches!(framing, Framing::Plain);
            self.prepare_send(done, framing, use_gso);
            match to.try_io(Interest::WRITABLE, || self.sendmmsg(to.as_raw_fd())) {
                // sendmmsg sends at least one message or fails; 0 only for none asked.
                Ok(0) => break,
                Ok(messages) => {
                    for run in &self.send_runs[..messages] {
                        for datagram in &self.datagrams[done..done + run.count] {
                            sent(datagram.len());
                        }
                        done += run.count;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The first message was a GSO run and the kernel refused to segment it on
                // this path: the same datagrams again, one message each.
                Err(e) if use_gso && self.send_runs[0].count > 1 && gso_refused(&e) => {
                    debug!("udp: UDP_SEGMENT refused on this path ({e}), sending without it");
                    gso.enabled = false;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Fills the send headers for the datagrams from `first` on: a GSO run or one
    /// datagram per message, up to [`SEND_MESSAGES`] messages.
    fn prepare_send(&mut self, first: usize, framing: Framing<'_>, use_gso: bool) {
        self.send_iov.clear();
        self.send_headers.clear();
        self.send_runs.clear();
        let base = self.buf.as_mut_ptr();
        let iov = |range: &Range<usize>| libc::iovec {
            // SAFETY: every range in `datagrams` lies inside `buf`.
            iov_base: unsafe { base.add(range.start) }.cast(),
            iov_len: range.len(),
        };
        let mut next = first;
        while next < self.datagrams.len() && self.send_runs.len() < SEND_MESSAGES {
            let run = &self.datagrams[next..];
            let count = if use_gso {
                gso_run(run.iter().map(ExactSizeIterator::len))
            } else {
                1
            };
            if let Framing::Prefixed(header) = framing {
                self.send_iov.push(libc::iovec {
                    // sendmsg only reads the buffers.
                    iov_base: header.as_ptr().cast_mut().cast(),
                    iov_len: header.len(),
                });
            }
            self.send_iov.extend(run[..count].iter().map(iov));
            self.send_runs.push(Run {
                count,
                segment: run[0].len(),
            });
            next += count;
        }
        // Second pass, once send_iov is complete and stays where it is: the headers.
        let per_message = usize::from(matches!(framing, Framing::Prefixed(_)));
        let mut iov_at = 0;
        for (run, control) in self.send_runs.iter().zip(&mut self.send_control) {
            let iovs = per_message + run.count;
            let mut header = empty_header();
            header.msg_hdr.msg_iov = self.send_iov[iov_at..].as_mut_ptr();
            header.msg_hdr.msg_iovlen = iovs as _;
            iov_at += iovs;
            if run.count > 1 {
                set_segment(&mut header.msg_hdr, control, run.segment);
            }
            self.send_headers.push(header);
        }
    }

    /// One `sendmmsg` of the prepared headers: how many messages went.
    fn sendmmsg(&mut self, fd: i32) -> io::Result<usize> {
        // SAFETY: send_headers point to iovecs in send_iov (over `buf` and a header that
        // outlives the call) and to control buffers in send_control, all alive and
        // unchanged during the call.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                self.send_headers.as_mut_ptr(),
                self.send_headers.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        // A short count means the next message failed (or would block); the next call,
        // from there, reports it (sendmmsg(2)).
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    }

    /// Copies of the datagrams from `first` on, for a send that has to wait.
    fn copies_from(&self, first: usize) -> Vec<Vec<u8>> {
        self.datagrams[first..]
            .iter()
            .map(|range| self.buf[range.clone()].to_vec())
            .collect()
    }
}

/// Errors with which `udp_send_skb` refuses a GSO message on a path, where the same
/// datagrams one by one may go: `EIO` (the device cannot checksum, IPsec), `EMSGSIZE` (a
/// segment larger than the path MTU), `EINVAL` (more segments than this kernel's
/// `UDP_MAX_SEGMENTS`), `ENOPROTOOPT`/`EOPNOTSUPP` (not offered after all).
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EMSGSIZE | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Adds a `UDP_SEGMENT` control message of `segment` bytes to `header`, in `control`.
fn set_segment(header: &mut libc::msghdr, control: &mut SendControl, segment: usize) {
    header.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    header.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as libc::c_uint) } as _;
    // SAFETY: msg_control points to `control`, aligned for cmsghdr (u64) and at least
    // msg_controllen (24) bytes long, so the first header and its two data bytes are
    // inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(header);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as libc::c_uint) as _;
        // gso_run keeps runs of segments under 64 KiB.
        let segment = u16::try_from(segment).unwrap_or(u16::MAX);
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
}

/// The segment size of a received GRO train, from its `UDP_GRO` control message; `None`
/// for a single datagram.
fn gro_segment(header: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel set msg_controllen to what it wrote into our control buffer;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay within it, and a UDP_GRO message carries an int.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(size).ok().filter(|&s| s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    None
}

/// The datagrams of a message of `len` bytes: a train cut every `segment` bytes (the
/// last may be shorter), or the whole message (which may be empty: a datagram may be).
fn segments(len: usize, segment: Option<usize>) -> impl Iterator<Item = Range<usize>> {
    let step = segment.unwrap_or(len).max(1);
    let count = len.div_ceil(step).max(1);
    (0..count).map(move |i| i * step..((i + 1) * step).min(len))
}

/// How many of the datagrams (given by their lengths, at least one) may go as one GSO
/// message: a run of the first one's size, ended by a shorter one, within the kernel's
/// limits. An empty datagram goes alone (a GSO segment size is never 0).
fn gso_run(mut lens: impl Iterator<Item = usize>) -> usize {
    let Some(segment) = lens.next() else {
        return 0;
    };
    if segment == 0 {
        return 1;
    }
    let (mut count, mut total) = (1, segment);
    for len in lens {
        if len > segment || len == 0 || count == MAX_SEGMENTS || total + len > MAX_GSO_PAYLOAD {
            break;
        }
        count += 1;
        total += len;
        if len < segment {
            break;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_train_is_cut_at_its_segment_size_and_ends_short() {
        let cut: Vec<_> = segments(3 * 1200 + 500, Some(1200)).collect();
        assert_eq!(cut, [0..1200, 1200..2400, 2400..3600, 3600..4100]);
        let even: Vec<_> = segments(2400, Some(1200)).collect();
        assert_eq!(even, [0..1200, 1200..2400]);
    }

    #[test]
    fn a_single_datagram_is_one_even_when_empty() {
        let whole: Vec<_> = segments(700, None).collect();
        assert_eq!((whole.len(), &whole[0]), (1, &(0..700)));
        let empty: Vec<_> = segments(0, None).collect();
        assert_eq!((empty.len(), &empty[0]), (1, &(0..0)));
    }

    #[test]
    fn a_gso_run_is_equal_sizes_ended_by_a_shorter_one() {
        assert_eq!(gso_run([1200, 1200, 500, 1200].into_iter()), 3);
        assert_eq!(gso_run([1200, 1200, 1200].into_iter()), 3);
        // A larger one cannot follow: segments are cut at the first one's size.
        assert_eq!(gso_run([500, 1200].into_iter()), 1);
        assert_eq!(gso_run([1200].into_iter()), 1);
    }

    #[test]
    fn a_gso_run_keeps_within_the_kernels_limits() {
        assert_eq!(gso_run(std::iter::repeat_n(100, 200)), MAX_SEGMENTS);
        assert_eq!(gso_run(std::iter::repeat_n(30_000, 3)), 2);
        assert_eq!(gso_run([0, 0].into_iter()), 1);
        assert_eq!(gso_run([1200, 0].into_iter()), 1);
    }
}
