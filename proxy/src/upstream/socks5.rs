//! SOCKS5 upstream: RFC 1928 CONNECT with the original destination as an IPv4 or IPv6
//! address, and RFC 1929 username/password authentication.

use std::{
    fmt, io,
    net::{SocketAddr, ToSocketAddrs as _},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::direct;

/// `--upstream socks5://[user:pass@]host:port`, resolved at start.
#[derive(Clone, PartialEq, Eq)]
pub struct Socks5Server {
    pub addr: SocketAddr,
    pub auth: Option<(String, String)>,
}

impl fmt::Debug for Socks5Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        match &self.auth {
            Some((user, _)) => write!(f, "socks5://{user}:***@{}", self.addr),
            None => write!(f, "socks5://{}", self.addr),
        }
    }
}

impl std::str::FromStr for Socks5Server {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("socks5://")
            .ok_or_else(|| format!("'{s}' is not a socks5:// URL"))?;
        let (auth, host) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (user, pass) = userinfo
                    .split_once(':')
                    .ok_or("credentials must be user:pass")?;
                if user.is_empty() || user.len() > 255 || pass.len() > 255 {
                    return Err("user and password must be 1-255 and 0-255 bytes (RFC 1929)".into());
                }
                (Some((user.to_owned(), pass.to_owned())), host)
            }
            None => (None, rest),
        };
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("'{host}': {e}"))?
            .next()
            .ok_or_else(|| format!("'{host}' resolves to no address"))?;
        Ok(Socks5Server { addr, auth })
    }
}

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const CMD_UDP_ASSOCIATE: u8 = 3;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("SOCKS5: {}", what.into()),
    )
}

/// The SOCKS5 reply codes (RFC 1928 section 6).
fn reply_error(code: u8) -> io::Error {
    let (kind, text) = match code {
        1 => (io::ErrorKind::Other, "general SOCKS server failure"),
        2 => (
            io::ErrorKind::PermissionDenied,
            "connection not allowed by ruleset",
        ),
        3 => (io::ErrorKind::NetworkUnreachable, "network unreachable"),
        4 => (io::ErrorKind::HostUnreachable, "host unreachable"),
        5 => (io::ErrorKind::ConnectionRefused, "connection refused"),
        6 => (io::ErrorKind::TimedOut, "TTL expired"),
        7 => (io::ErrorKind::Unsupported, "command not supported"),
        8 => (io::ErrorKind::Unsupported, "address type not supported"),
        _ => (io::ErrorKind::Other, "unknown reply"),
    };
    io::Error::new(kind, format!("SOCKS5 server: {text} ({code})"))
}

/// Encodes an address as ATYP + address + port.
pub fn encode_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr {
        SocketAddr::V4(a) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Reads ATYP + address + port from a reply: the address for IPv4 and IPv6, `None` for a
/// domain name (consumed all the same).
async fn read_addr(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let atyp = stream.read_u8().await?;
    let len = match atyp {
        ATYP_V4 => 4,
        ATYP_V6 => 16,
        ATYP_DOMAIN => usize::from(stream.read_u8().await?),
        other => return Err(protocol_error(format!("unknown address type {other}"))),
    };
    let mut raw = vec![0u8; len + 2];
    stream.read_exact(&mut raw).await?;
    let port = u16::from_be_bytes([raw[len], raw[len + 1]]);
    Ok(match atyp {
        ATYP_V4 => <[u8; 4]>::try_from(&raw[..4])
            .ok()
            .map(|ip| SocketAddr::from((ip, port))),
        ATYP_V6 => <[u8; 16]>::try_from(&raw[..16])
            .ok()
            .map(|ip| SocketAddr::from((ip, port))),
        _ => None,
    })
}

/// Sends a request and reads the reply's status and bound address.
async fn request(
    stream: &mut TcpStream,
    cmd: u8,
    addr: SocketAddr,
) -> io::Result<Option<SocketAddr>> {
    let mut request = vec![VERSION, cmd, 0];
    encode_addr(addr, &mut request);
    stream.write_all(&request).await?;
    let mut head = [0u8; 3];
    stream.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(protocol_error(format!("reply version {}", head[0])));
    }
    if head[1] != 0 {
        return Err(reply_error(head[1]));
    }
    read_addr(stream).await
}

/// UDP ASSOCIATE (RFC 1928 section 7): returns the control connection, which must stay
/// open for as long as the association is used, and the relay address to send to.
pub async fn udp_associate(
    server: &Socks5Server,
    mark: u32,
) -> io::Result<(TcpStream, SocketAddr)> {
    let mut stream = direct::connect(server.addr, None, mark).await?;
    handshake(&mut stream, server.auth.as_ref()).await?;
    let any = match server.addr {
        SocketAddr::V4(_) => SocketAddr::from(([0u8; 4], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u8; 16], 0)),
    };
    let relay = request(&mut stream, CMD_UDP_ASSOCIATE, any)
        .await?
        .ok_or_else(|| protocol_error("UDP relay given as a domain name"))?;
    // An unspecified relay address means "the server's own".
    let relay = if relay.ip().is_unspecified() {
        SocketAddr::new(server.addr.ip(), relay.port())
    } else {
        relay
    };
    Ok((stream, relay))
}

/// The header in front of each relayed datagram: RSV, FRAG = 0, then the destination.
pub fn udp_header(dst: SocketAddr) -> Vec<u8> {
    let mut header = vec![0, 0, 0];
    encode_addr(dst, &mut header);
    header
}

/// Where the payload starts in a datagram from the relay, or `None` for a malformed or
/// fragmented one (FRAG != 0 is not supported, and RFC 1928 lets us drop it).
pub fn udp_payload_offset(datagram: &[u8]) -> Option<usize> {
    if datagram.len() < 4 || datagram[2] != 0 {
        return None;
    }
    let len = match datagram[3] {
        ATYP_V4 => 4,
        ATYP_V6 => 16,
        ATYP_DOMAIN => 1 + usize::from(*datagram.get(4)?),
        _ => return None,
    };
    let offset = 4 + len + 2;
    (offset <= datagram.len()).then_some(offset)
}

/// Connects to the SOCKS5 server, authenticates if configured and asks for a CONNECT to
/// `dst`. Returns the stream, ready to relay.
pub async fn connect(server: &Socks5Server, dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let mut stream = direct::connect(server.addr, None, mark).await?;
    handshake(&mut stream, server.auth.as_ref()).await?;
    request(&mut stream, CMD_CONNECT, dst).await?;
    Ok(stream)
}

/// Method selection and, when the server picks it, username/password (RFC 1929).
pub async fn handshake(stream: &mut TcpStream, auth: Option<&(String, String)>) -> io::Result<()> {
    let greeting: &[u8] = if auth.is_some() {
        &[VERSION, 2, NO_AUTH, USER_PASS]
    } else {
        &[VERSION, 1, NO_AUTH]
    };
    stream.write_all(greeting).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    if choice[0] != VERSION {
        return Err(protocol_error(format!(
            "server speaks version {}",
            choice[0]
        )));
    }
    match (choice[1], auth) {
        (NO_AUTH, _) => Ok(()),
        (USER_PASS, Some((user, pass))) => {
            let mut msg = vec![1, user.len() as u8];
            msg.extend_from_slice(user.as_bytes());
            msg.push(pass.len() as u8);
            msg.extend_from_slice(pass.as_bytes());
            stream.write_all(&msg).await?;
            let mut status = [0u8; 2];
            stream.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "SOCKS5 server refused the username/password",
                ));
            }
            Ok(())
        }
        (NO_ACCEPTABLE, _) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "SOCKS5 server accepts none of our authentication methods",
        )),
        (other, _) => Err(protocol_error(format!("server chose method {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_credentials() {
        let s: Socks5Server = "socks5://127.0.0.1:1080".parse().expect("valid");
        assert_eq!(s.addr, "127.0.0.1:1080".parse().expect("addr"));
        assert_eq!(s.auth, None);
        let s: Socks5Server = "socks5://alice:s3cret@[::1]:1080".parse().expect("valid");
        assert_eq!(s.addr, "[::1]:1080".parse().expect("addr"));
        assert_eq!(s.auth, Some(("alice".into(), "s3cret".into())));
        assert_eq!(format!("{s:?}"), "socks5://alice:***@[::1]:1080");
        assert!("http://127.0.0.1:1080".parse::<Socks5Server>().is_err());
        assert!(
            "socks5://alice@127.0.0.1:1080"
                .parse::<Socks5Server>()
                .is_err()
        );
        assert!("socks5://127.0.0.1".parse::<Socks5Server>().is_err());
    }

    #[test]
    fn udp_headers_round_trip() {
        let dst: SocketAddr = "198.51.100.2:53".parse().expect("addr");
        let mut datagram = udp_header(dst);
        assert_eq!(datagram, [0, 0, 0, 1, 198, 51, 100, 2, 0, 53]);
        datagram.extend_from_slice(b"payload");
        assert_eq!(udp_payload_offset(&datagram), Some(10));
        let mut fragment = datagram.clone();
        fragment[2] = 1;
        assert_eq!(udp_payload_offset(&fragment), None);
        assert_eq!(udp_payload_offset(&datagram[..6]), None);
        assert_eq!(
            udp_payload_offset(&[0, 0, 0, 3, 3, b'a', b'b', b'c', 0, 53, 1]),
            Some(10)
        );
    }

    #[test]
    fn addresses_encode_as_rfc_1928_says() {
        let mut v = Vec::new();
        encode_addr("192.0.2.7:80".parse().expect("addr"), &mut v);
        assert_eq!(v, [1, 192, 0, 2, 7, 0, 80]);
        let mut v = Vec::new();
        encode_addr("[2001:db8::1]:443".parse().expect("addr"), &mut v);
        assert_eq!(v.len(), 1 + 16 + 2);
        assert_eq!(v[0], 4);
        assert_eq!(&v[17..], &[1, 187]);
    }
}
