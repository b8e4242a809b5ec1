//! Copying: read(2) into a per-thread scratch buffer, write(2) out at once. Every direction
//! starts here (small exchanges cost no pipe and no per-connection buffer); `--relay copy`
//! stays here, and splice mode leaves for `splice.rs` once a read fills the buffer.

use std::io::{self, Read as _};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

use super::{CHUNK, park::Flag};

/// What one read brought.
pub(super) enum Step {
    Eof,
    /// The read filled the scratch buffer: more is likely waiting (bulk).
    Full,
    Partial,
    /// The park flag was raised: these bytes were read and not written (possibly none).
    Parked(Vec<u8>),
}

thread_local! {
    /// Scratch space for copies, shared by the connections of a runtime thread: the read
    /// and the first write happen without an await in between, so none holds it. (UDP
    /// sessions have a batch scratch of their own, in `tproxy::udp_batch`.)
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; CHUNK]);
}

/// Reads once and writes what it can at once; whatever the peer cannot take yet is kept in
/// a buffer of its own and written as the socket drains. Once `park` is raised, stops at
/// the next wait instead, with what it holds (`park.rs`).
pub(super) async fn copy_step(
    from: &TcpStream,
    to: &TcpStream,
    total: &mut u64,
    park: &Flag,
) -> io::Result<Step> {
    loop {
        tokio::select! {
            biased;
            () = park.raised() => return Ok(Step::Parked(Vec::new())),
            readable = from.readable() => readable?,
        }
        let attempt = SCRATCH.with(|scratch| -> io::Result<Option<(Step, Vec<u8>)>> {
            let mut buf = scratch.borrow_mut();
            let n = match read_draining(from, &mut buf) {
                Ok(0) => return Ok(Some((Step::Eof, Vec::new()))),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            let step = if n == buf.len() {
                Step::Full
            } else {
                Step::Partial
            };
            let mut sent = 0;
            while sent < n {
                match to.try_write(&buf[sent..n]) {
                    Ok(m) => sent += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            *total += sent as u64;
            Ok(Some((step, buf[sent..n].to_vec())))
        })?;
        let Some((step, left)) = attempt else {
            continue;
        };
        return Ok(match write_all(to, &left, total, park).await? {
            Written::All => step,
            Written::Parked(rest) => Step::Parked(rest),
        });
    }
}

/// Reads what `from` holds into `buf`, like `try_read`, except that a read returning less
/// than `buf` holds also clears the socket's read readiness: the next wait goes straight to
/// the reactor, without a read that could only fail with EAGAIN (one syscall per direction
/// and exchange). A short read means the receive queue is empty: `tcp_recvmsg_locked`
/// (net/ipv4/tcp.c) goes on to the next queued skb until `buf` is full, and stops early only
/// when none is left, on an error or a shutdown (which tokio keeps as read-closed readiness,
/// never cleared), or at the urgent mark of TCP urgent data (RFC 6093: not to be used; its
/// rest then waits for the next segment or the FIN). HAProxy does the same
/// (`raw_sock_to_buf`, src/raw_sock.c: "socket buffer exhausted"). The readiness cleared is
/// the event the read was made under (tokio compares ticks), so bytes that arrive after the
/// read raise a new event and are not missed.
fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let capacity = buf.len();
    let mut short = None;
    let read = from.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(from)).read(buf)?;
        if n > 0 && n < capacity {
            short = Some(n);
            // What makes tokio clear the readiness it observed; the count is kept aside.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, short) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (read, _) => read,
    }
}

/// How [`write_all`] ended.
pub(super) enum Written {
    All,
    /// The park flag was raised first: these bytes were not written.
    Parked(Vec<u8>),
}

/// Writes all of `buf` as the socket takes it, counting what went out in `total`; or, once
/// `park` is raised, stops at the next wait with what is left.
pub(super) async fn write_all(
    to: &TcpStream,
    mut buf: &[u8],
    total: &mut u64,
    park: &Flag,
) -> io::Result<Written> {
    while !buf.is_empty() {
        tokio::select! {
            biased;
            () = park.raised() => return Ok(Written::Parked(buf.to_vec())),
            writable = to.writable() => writable?,
        }
        match to.try_write(buf) {
            Ok(m) => {
                buf = &buf[m..];
                *total += m as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Written::All)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt as _;

    use super::*;
    use crate::relay::loopback_pair;

    /// After a short read the readiness is gone: bytes that arrive next are not read until
    /// the reactor reports them (no read is tried on the stale readiness), and then they
    /// are.
    #[tokio::test]
    async fn a_short_read_clears_the_readiness_and_the_next_bytes_wake_the_reader() {
        let (mut writer, reader) = loopback_pair().await;
        let mut buf = [0u8; 64];
        writer.write_all(b"hello").await.expect("write");
        reader.readable().await.expect("readable");
        assert_eq!(read_draining(&reader, &mut buf).expect("read"), 5);

        writer.write_all(b"more").await.expect("write");
        // Queued already (loopback delivers at once), but this task has not given the
        // reactor a turn: the readiness the short read cleared is not back yet.
        let stale = reader.try_read(&mut buf);
        assert_eq!(
            stale.map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "a read was tried on the readiness of the short read"
        );
        tokio::time::timeout(Duration::from_secs(5), reader.readable())
            .await
            .expect("the new bytes raised no readiness")
            .expect("readable");
        assert_eq!(read_draining(&reader, &mut buf).expect("read"), 4);
        assert_eq!(&buf[..4], b"more");
    }

    /// A read that fills the buffer keeps the readiness: more may be queued.
    #[tokio::test]
    async fn a_full_read_keeps_the_readiness() {
        let (mut writer, reader) = loopback_pair().await;
        writer.write_all(&[7u8; 100]).await.expect("write");
        reader.readable().await.expect("readable");
        let mut buf = [0u8; 64];
        assert_eq!(read_draining(&reader, &mut buf).expect("read"), 64);
        assert_eq!(reader.try_read(&mut buf).expect("the rest at once"), 36);
    }
}
