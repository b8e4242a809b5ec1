//! The handover's framing: one message per SOCK_SEQPACKET record, so that the descriptors
//! passed with a message (SCM_RIGHTS) arrive with it and never with a neighbour.
//!
//! A record is `[u32 header length, little endian][header: JSON][payload: raw bytes]`. The
//! header says what the message is ([`Message`]); the payload carries the bytes a parked
//! relay held (`relay/park.rs`), which JSON would blow up fourfold.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        linux::net::SocketAddrExt as _,
        unix::net::SocketAddr,
    },
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use tokio::io::unix::AsyncFd;

use super::{HandoverError, Message};

/// The largest record: a parked relay holds at most 64 KiB per direction (one read, or a
/// pipe's default capacity), plus its header.
pub const MAX_RECORD: usize = 192 * 1024;
/// The most descriptors in one record (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;

/// One message, its payload and the descriptors passed with it.
pub struct Record {
    pub message: Message,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Record {
    pub fn new(message: Message) -> Self {
        Record {
            message,
            payload: Vec::new(),
            fds: Vec::new(),
        }
    }
}

/// The abstract address of the handover socket of `table`'s agent.
fn address(table: u32) -> io::Result<UnixAddr> {
    let name = proxy_common::handover_socket_name(table);
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let name = addr
        .as_abstract_name()
        .ok_or_else(|| io::Error::other("not an abstract address"))?;
    UnixAddr::new_abstract(name).map_err(io::Error::from)
}

/// Registers a socket with the runtime.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor (OwnedFd), so it stays open for as long as it
    // is registered, and nothing else closes it.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(io::Error::from)
}

/// The running agent's end: bound and listening, for its successor to connect to.
pub struct Listener(AsyncFd<OwnedFd>);

impl Listener {
    /// Binds the handover socket of `table` (AddrInUse: an agent holds it).
    pub fn bind(table: u32) -> io::Result<Self> {
        let fd = seqpacket()?;
        socket::bind(fd.as_raw_fd(), &address(table)?)?;
        socket::listen(&fd, Backlog::new(4).map_err(io::Error::from)?)?;
        Ok(Listener(register(fd)?))
    }

    /// A listener handed over by the previous agent.
    pub fn inherit(fd: OwnedFd) -> io::Result<Self> {
        Ok(Listener(register(fd)?))
    }

    /// A descriptor of the same socket, to hand over.
    pub fn dup(&self) -> io::Result<OwnedFd> {
        self.0.get_ref().try_clone()
    }

    /// The next connection, from root or the agent's own user only (others are closed).
    pub async fn accept(&self) -> io::Result<Channel> {
        loop {
            let mut ready = self.0.readable().await?;
            let accepted = ready.try_io(|fd| {
                socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            let Ok(accepted) = accepted else { continue };
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(accepted?) };
            match Channel::new(fd) {
                Ok(channel) => return Ok(channel),
                Err(e) => log::warn!("handover socket: {e}"),
            }
        }
    }
}

/// A connected handover channel, either end.
pub struct Channel(AsyncFd<OwnedFd>);

impl Channel {
    /// Checks the peer (root, or the agent's own user) and registers the socket.
    fn new(fd: OwnedFd) -> Result<Self, HandoverError> {
        let cred = socket::getsockopt(&fd, sockopt::PeerCredentials)
            .map_err(|e| HandoverError::Io("reading the peer's credentials", e.into()))?;
        let own = nix::unistd::geteuid().as_raw();
        if cred.uid() != 0 && cred.uid() != own {
            return Err(HandoverError::Peer {
                pid: cred.pid(),
                uid: cred.uid(),
            });
        }
        // Records up to MAX_RECORD must fit the send buffer (unix_dgram_sendmsg refuses a
        // record larger than it); capped by net.core.wmem_max, which the default exceeds.
        let _ = socket::setsockopt(&fd, sockopt::SndBuf, &(2 * MAX_RECORD));
        let fd = register(fd).map_err(|e| HandoverError::Io("registering the socket", e))?;
        Ok(Channel(fd))
    }

    /// Connects to the handover socket of `table`'s agent. `Ok(None)`: no agent listens.
    pub fn connect(table: u32) -> Result<Option<Self>, HandoverError> {
        let fd = seqpacket().map_err(|e| HandoverError::Io("creating a socket", e))?;
        let addr = address(table).map_err(|e| HandoverError::Io("naming the socket", e))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => {
                return Err(HandoverError::Io(
                    "connecting to the running agent",
                    e.into(),
                ));
            }
        }
        Channel::new(fd).map(Some)
    }

    /// The peer's process id.
    pub fn peer_pid(&self) -> Option<i32> {
        socket::getsockopt(self.0.get_ref(), sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid())
    }

    /// Sends one record.
    pub async fn send(&self, record: Record) -> Result<(), HandoverError> {
        let header = serde_json::to_vec(&record.message)
            .map_err(|e| HandoverError::Io("encoding a message", io::Error::other(e)))?;
        let len = u32::try_from(header.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes();
        if 4 + header.len() + record.payload.len() > MAX_RECORD || record.fds.len() > MAX_FDS {
            return Err(HandoverError::Io(
                "sending a message",
                io::Error::other("the record is larger than the handover allows"),
            ));
        }
        let raw: Vec<RawFd> = record.fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let iov = [
            IoSlice::new(&len),
            IoSlice::new(&header),
            IoSlice::new(&record.payload),
        ];
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        loop {
            let mut ready = self
                .0
                .writable()
                .await
                .map_err(|e| HandoverError::Io("waiting to send", e))?;
            let sent = ready.try_io(|fd| {
                socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(HandoverError::Io("sending a message", e)),
                Err(_would_block) => {}
            }
        }
    }

    /// Receives one record, waiting at most `timeout`. The peer closing the channel is
    /// [`HandoverError::Closed`].
    pub async fn recv(&self, timeout: Duration) -> Result<Record, HandoverError> {
        tokio::time::timeout(timeout, self.recv_now())
            .await
            .map_err(|_| HandoverError::Timeout(timeout))?
    }

    async fn recv_now(&self) -> Result<Record, HandoverError> {
        let mut buf = vec![0u8; MAX_RECORD];
        loop {
            let mut ready = self
                .0
                .readable()
                .await
                .map_err(|e| HandoverError::Io("waiting to receive", e))?;
            let received = ready.try_io(|fd| {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
                let msg = socket::recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: the kernel installed these descriptors for this process
                        // with this message; nothing else owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                Ok((msg.bytes, fds, truncated))
            });
            let (len, fds, truncated) = match received {
                Ok(result) => result.map_err(|e| HandoverError::Io("receiving a message", e))?,
                Err(_would_block) => continue,
            };
            if len == 0 {
                return Err(HandoverError::Closed);
            }
            if truncated {
                return Err(HandoverError::Malformed("a truncated record".into()));
            }
            return decode(&buf[..len], fds);
        }
    }
}

fn decode(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Record, HandoverError> {
    let malformed = |what: &str| HandoverError::Malformed(what.to_owned());
    let len: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed("a record shorter than its length field"))?;
    let len = u32::from_le_bytes(len) as usize;
    let header = bytes
        .get(4..4 + len)
        .ok_or_else(|| malformed("a header longer than its record"))?;
    let message = serde_json::from_slice(header)
        .map_err(|e| HandoverError::Malformed(format!("a header that is not a message: {e}")))?;
    Ok(Record {
        message,
        payload: bytes[4 + len..].to_vec(),
        fds,
    })
}
