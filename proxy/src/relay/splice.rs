//! Splice mode: the bulk of a direction moves socket to pipe to socket with splice(2),
//! never copied into userspace. The pipe is made once the direction turned out to be bulk
//! (a read filled the scratch buffer), so an idle connection holds none. Where splice is
//! refused the direction goes back to copying without losing a byte: a refusal from socket
//! to pipe leaves the pipe empty, and after a refusal from pipe to socket its bytes are read
//! back and written out.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
};

use nix::fcntl::{SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream};

use super::{
    CHUNK,
    copy::{Written, write_all},
    park::Flag,
};

/// How a run of splice(2) ended.
pub(super) enum Spliced {
    /// EOF, for the caller to pass on.
    Eof,
    /// splice(2) was refused, and every byte that went into the pipe has been written out:
    /// copying can take over.
    Refused,
    /// The park flag was raised: these bytes (taken back out of the pipe) were read and not
    /// written.
    Parked(Vec<u8>),
}

pub(super) async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    total: &mut u64,
    park: &Flag,
) -> io::Result<Spliced> {
    // (read end, write end), made once the direction turned out to be bulk. Without one
    // (out of descriptors), copying needs none.
    let Ok((pipe_r, pipe_w)) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
    else {
        return Ok(Spliced::Refused);
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let splice_out = |pipe: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize| {
        splice(pipe, None, to, None, len, flags).map_err(io::Error::from)
    };
    loop {
        // The pipe is empty here: parking holds nothing.
        tokio::select! {
            biased;
            () = park.raised() => return Ok(Spliced::Parked(Vec::new())),
            readable = from.readable() => readable?,
        }
        let read = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
        });
        let left = match read {
            Ok(0) => return Ok(Spliced::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // The pipe is empty between rounds: refused here, nothing is lost by copying.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Spliced::Refused),
            Err(e) => return Err(e),
        };
        match empty_pipe(pipe_r.as_fd(), to, left, total, park, splice_out).await? {
            Emptied::Spliced => {}
            Emptied::Copied => return Ok(Spliced::Refused),
            Emptied::Parked(held) => return Ok(Spliced::Parked(held)),
        }
    }
}

/// How the pipe was emptied.
#[derive(Debug, PartialEq, Eq)]
enum Emptied {
    /// All by splice(2).
    Spliced,
    /// splice(2) to the socket was refused; what was left was read back and written.
    Copied,
    /// The park flag was raised: what was left in the pipe was read back, not written.
    Parked(Vec<u8>),
}

/// Moves the `left` bytes in the pipe to `to` with `splice_out` (splice(2), or a stand-in
/// in tests). Where it is refused (EINVAL), those bytes are read back from the pipe and
/// written with write(2): they are part of the stream, and dropping the pipe with them in it
/// would lose them silently. Any other failure ends the connection, which the caller resets.
/// Once `park` is raised, the bytes still in the pipe are read back and returned instead.
async fn empty_pipe(
    pipe_r: BorrowedFd<'_>,
    to: &TcpStream,
    mut left: usize,
    total: &mut u64,
    park: &Flag,
    splice_out: impl Fn(BorrowedFd<'_>, BorrowedFd<'_>, usize) -> io::Result<usize>,
) -> io::Result<Emptied> {
    while left > 0 {
        tokio::select! {
            biased;
            () = park.raised() => return Ok(Emptied::Parked(read_pipe(pipe_r, left)?)),
            writable = to.writable() => writable?,
        }
        match to.try_io(Interest::WRITABLE, || splice_out(pipe_r, to.as_fd(), left)) {
            Ok(n) => {
                left -= n;
                *total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let held = read_pipe(pipe_r, left)?;
                return Ok(match write_all(to, &held, total, park).await? {
                    Written::All => Emptied::Copied,
                    Written::Parked(rest) => Emptied::Parked(rest),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Emptied::Spliced)
}

/// Reads the `left` bytes queued in the pipe.
fn read_pipe(pipe_r: BorrowedFd<'_>, left: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; left];
    let mut filled = 0;
    while filled < left {
        // The bytes are in the pipe already: this never waits (and would fail with EAGAIN,
        // ending the connection with a reset, rather than lose them).
        match nix::unistd::read(pipe_r, &mut buf[filled..]) {
            Ok(0) => return Err(io::Error::other("the pipe held fewer bytes than it took")),
            Ok(n) => filled += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, os::fd::AsFd as _};

    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::relay::loopback_pair;

    /// When splice(2) from the pipe to the socket is refused after part of the pipe went
    /// out, the rest still reaches the peer, in order, and counts as relayed.
    #[tokio::test]
    async fn a_refused_splice_out_writes_the_pipe_out_by_hand() {
        let (to, mut receiver) = loopback_pair().await;
        let (pipe_r, pipe_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .expect("pipe");
        let sent: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut queued = 0;
        while queued < sent.len() {
            queued += nix::unistd::write(&pipe_w, &sent[queued..]).expect("fill the pipe");
        }
        // The first call splices 1,000 bytes for real, every later one is refused.
        let calls = Cell::new(0);
        let splice_out = |pipe: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize| {
            calls.set(calls.get() + 1);
            if calls.get() == 1 {
                splice(pipe, None, to, None, len.min(1000), SpliceFFlags::empty())
                    .map_err(io::Error::from)
            } else {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
        };
        let mut total = 0;
        let park = Flag::default();
        let emptied = empty_pipe(
            pipe_r.as_fd(),
            &to,
            sent.len(),
            &mut total,
            &park,
            splice_out,
        )
        .await
        .expect("emptying the pipe");
        assert_eq!(emptied, Emptied::Copied);
        assert_eq!(calls.get(), 2, "splice was tried again after its refusal");
        assert_eq!(total, sent.len() as u64);
        drop(to);
        let mut received = Vec::new();
        receiver
            .read_to_end(&mut received)
            .await
            .expect("reading what was relayed");
        assert_eq!(received.len(), sent.len(), "bytes lost from the pipe");
        assert!(received == sent, "bytes out of order");
    }

    /// Any other failure of splice(2) out is the connection's, and is reported (the relay
    /// then resets both sides) instead of being taken for a refusal.
    #[tokio::test]
    async fn a_failed_splice_out_ends_the_relay_with_its_error() {
        let (to, _receiver) = loopback_pair().await;
        let (pipe_r, pipe_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .expect("pipe");
        nix::unistd::write(&pipe_w, b"queued").expect("fill the pipe");
        let mut total = 0;
        let park = Flag::default();
        let failed = empty_pipe(pipe_r.as_fd(), &to, 6, &mut total, &park, |_, _, _| {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        })
        .await;
        assert_eq!(failed.map_err(|e| e.raw_os_error()), Err(Some(libc::EPIPE)));
        assert_eq!(total, 0);
    }
}
