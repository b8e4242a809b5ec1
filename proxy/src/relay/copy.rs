//! Copying: read(2) into a per-thread scratch buffer, write(2) out at once. Every direction
//! starts here (small exchanges cost no pipe and no per-connection buffer); `--relay copy`
//! stays here, and splice mode leaves for `splice.rs` once a read fills the buffer.

use std::io;

use tokio::net::TcpStream;

use super::CHUNK;

/// What one read brought.
pub(super) enum Step {
    Eof,
    /// The read filled the scratch buffer: more is likely waiting (bulk).
    Full,
    Partial,
}

thread_local! {
    /// Scratch space for copies, shared by the connections of a runtime thread: the read
    /// and the first write happen without an await in between, so none holds it. (UDP
    /// sessions have a batch scratch of their own, in `tproxy::udp_batch`.)
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; CHUNK]);
}

/// Reads once and writes what it can at once; whatever the peer cannot take yet is kept in
/// a buffer of its own and written as the socket drains.
pub(super) async fn copy_step(
    from: &TcpStream,
    to: &TcpStream,
    total: &mut u64,
) -> io::Result<Step> {
    loop {
        from.readable().await?;
        let attempt = SCRATCH.with(|scratch| -> io::Result<Option<(Step, Vec<u8>)>> {
            let mut buf = scratch.borrow_mut();
            let n = match from.try_read(&mut buf) {
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
        write_all(to, &left, total).await?;
        return Ok(step);
    }
}

/// Writes all of `buf` as the socket takes it, counting what went out in `total`.
pub(super) async fn write_all(to: &TcpStream, mut buf: &[u8], total: &mut u64) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(m) => {
                buf = &buf[m..];
                *total += m as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
