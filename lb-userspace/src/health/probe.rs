//! One probe of one Backend: a TCP connect, an HTTP/1.1 `GET` or a UDP exchange, bounded
//! as a whole by the check's timeout. A probe holds no state between runs: every run opens
//! its own socket.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Request,
    header::{CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UdpSocket};

use crate::config::{CheckKind, HealthCheck};

/// `User-Agent` of HTTP checks.
const HTTP_USER_AGENT: &str = "mlb-health-check";
/// Largest UDP reply read (longer replies are truncated, their prefix still judged).
const UDP_REPLY_MAX: usize = 65_535;

/// What a probe does, resolved for one Backend address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    Http {
        path: String,
        /// Value of the `Host` header.
        host: String,
        status: RangeInclusive<u16>,
    },
    Udp {
        send: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

/// A probe of one `address:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub target: SocketAddr,
    pub timeout: Duration,
}

/// Why a probe failed. `Display` is the reason carried by events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the check's timeout.
    Timeout(Duration),
    /// TCP RST to the SYN, or ICMP port unreachable to the UDP datagram.
    Refused,
    /// The connection was reset or aborted after it was established.
    Reset,
    /// ICMP host or network unreachable.
    Unreachable,
    /// Any other socket error.
    Io(String),
    /// An HTTP status outside the expected range.
    HttpStatus(u16),
    /// Not a valid HTTP response, or the connection closed before one.
    Http(String),
    /// A UDP reply that does not start with the expected bytes.
    UnexpectedReply,
}

impl Failure {
    /// A stable label for counting failures by reason (metrics): `timeout`, `refused`,
    /// `reset`, `unreachable`, `io`, `http_status`, `http`, `unexpected_reply`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            Failure::Refused => "refused",
            Failure::Reset => "reset",
            Failure::Unreachable => "unreachable",
            Failure::Io(_) => "io",
            Failure::HttpStatus(_) => "http_status",
            Failure::Http(_) => "http",
            Failure::UnexpectedReply => "unexpected_reply",
        }
    }

    /// Every label [`Failure::kind`] can return.
    pub const KINDS: [&'static str; 8] = [
        "timeout",
        "refused",
        "reset",
        "unreachable",
        "io",
        "http_status",
        "http",
        "unexpected_reply",
    ];
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout(after) => {
                write!(f, "timeout after {}", humantime::format_duration(*after))
            }
            Failure::Refused => f.write_str("connection refused"),
            Failure::Reset => f.write_str("connection reset"),
            Failure::Unreachable => f.write_str("unreachable"),
            Failure::Io(e) => f.write_str(e),
            Failure::HttpStatus(status) => write!(f, "HTTP {status}"),
            Failure::Http(e) => write!(f, "bad HTTP response: {e}"),
            Failure::UnexpectedReply => f.write_str("unexpected UDP reply"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Reset,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Failure::Unreachable
            }
            io::ErrorKind::TimedOut => Failure::Io("timed out (kernel)".into()),
            _ => Failure::Io(e.to_string()),
        }
    }
}

/// A hyper error as a failure: the socket error under it if there is one.
fn http_failure(e: &hyper::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return Failure::from(io::Error::new(io.kind(), io.to_string()));
        }
        source = error.source();
    }
    Failure::Http(e.to_string())
}

/// The default `Host` header: the address (IPv6 in brackets), with the port unless 80.
pub fn default_host(target: SocketAddr) -> String {
    let address = match target.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    if target.port() == 80 {
        address
    } else {
        format!("{address}:{}", target.port())
    }
}

impl Probe {
    /// The probe `check` calls for on `address`; `None` for [`CheckKind::None`].
    pub fn new(check: &HealthCheck, address: IpAddr) -> Option<Self> {
        let target = SocketAddr::new(address, check.port);
        let kind = match &check.kind {
            CheckKind::None => return None,
            CheckKind::Tcp => ProbeKind::Tcp,
            CheckKind::Http { path, host, status } => ProbeKind::Http {
                path: path.clone(),
                host: host.clone().unwrap_or_else(|| default_host(target)),
                status: status.clone(),
            },
            CheckKind::Udp { send, expect } => ProbeKind::Udp {
                send: send.clone(),
                expect: expect.clone(),
            },
        };
        Some(Self {
            kind,
            target,
            timeout: check.timeout,
        })
    }

    /// Runs the probe once: `Ok` if the Backend passed.
    pub async fn run(&self) -> Result<(), Failure> {
        let attempt = async {
            match &self.kind {
                ProbeKind::Tcp => tcp(self.target).await,
                ProbeKind::Http { path, host, status } => {
                    http(self.target, path, host, status).await
                }
                ProbeKind::Udp { send, expect } => udp(self.target, send, expect.as_deref()).await,
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(Failure::Timeout(self.timeout)))
    }
}

async fn tcp(target: SocketAddr) -> Result<(), Failure> {
    TcpStream::connect(target).await?;
    Ok(())
}

async fn http(
    target: SocketAddr,
    path: &str,
    host: &str,
    expected: &RangeInclusive<u16>,
) -> Result<(), Failure> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| http_failure(&e))?;
    let request = Request::get(path)
        .header(HOST, host)
        .header(USER_AGENT, HTTP_USER_AGENT)
        .header(CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| Failure::Http(format!("request: {e}")))?;
    // The connection is driven here, not spawned: the timeout around the probe then ends
    // everything the probe started.
    let response = sender.send_request(request);
    tokio::pin!(connection, response);
    let response = tokio::select! {
        biased;
        response = &mut response => response,
        ended = &mut connection => match ended {
            Err(e) => return Err(http_failure(&e)),
            // It ended after handing over the response (with `connection: close`), or
            // without one (then the response future fails).
            Ok(()) => response.await,
        },
    }
    .map_err(|e| http_failure(&e))?;
    let status = response.status().as_u16();
    if expected.contains(&status) {
        Ok(())
    } else {
        Err(Failure::HttpStatus(status))
    }
}

async fn udp(target: SocketAddr, send: &[u8], expect: Option<&[u8]>) -> Result<(), Failure> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected: only the Backend's replies are read, and ICMP port unreachable comes
    // back as "connection refused".
    socket.connect(target).await?;
    socket.send(send).await?;
    let mut reply = vec![0; UDP_REPLY_MAX];
    let len = socket.recv(&mut reply).await?;
    match expect {
        Some(prefix) if !reply[..len].starts_with(prefix) => Err(Failure::UnexpectedReply),
        _ => Ok(()),
    }
}
