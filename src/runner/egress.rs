//! Egress for jobs with network: an HTTP proxy on the job's own loopback,
//! served by the worker, with a destination policy.
//!
//! A job with `enable_network` still gets a network namespace of its own: it
//! sees only `lo`, so the worker's Redis, its metrics port and every other
//! service on the host's loopback are simply not there (the judge0 advisory
//! CVE-2024-29021 was a sandbox sharing the host's network). Its only way out
//! is `127.0.0.1:3128` inside that namespace: a listening socket the child
//! created there (while still root) and handed to the worker with the seccomp
//! listener. The worker accepts on it and relays `CONNECT host:port` and
//! absolute-URI HTTP requests, to an operator's upstream proxy when one is
//! configured, or directly, after checking the destination:
//! loopback, private, link-local (cloud metadata), CGNAT, multicast and
//! unspecified addresses are refused unless the operator allows a range, and
//! the worker's own Redis and metrics addresses are always refused. Names are
//! resolved here and the checked address is the one connected to, so a DNS
//! answer cannot swap in a forbidden address afterwards.
//!
//! Blocking std threads, not tokio: the runner has no runtime, and a job's
//! connections are few.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The port of the relay on the job's loopback.
pub const PROXY_PORT: u16 = 3128;
const HEAD_LIMIT: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// An address range, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse().ok()?, p.parse().ok()?),
            None => {
                let a: IpAddr = s.parse().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if matches!(addr, IpAddr::V4(_)) {
            32
        } else {
            128
        };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip {
                IpAddr::V4(v) => (u32::from(v) as u128, 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        };
        let (net, width) = bits(self.addr);
        let (addr, w2) = bits(ip);
        if width != w2 {
            return false;
        }
        if self.prefix == 0 {
            return true;
        }
        let shift = width - self.prefix;
        (net >> shift) == (addr >> shift)
    }
}

/// Where jobs may connect.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// `host:port` of an operator's HTTP proxy that all traffic goes through.
    pub upstream: Option<String>,
    /// Ranges allowed even though they are internal.
    pub allow: Vec<Cidr>,
    /// Addresses never allowed (the worker's Redis and metrics).
    pub deny: Vec<SocketAddr>,
}

fn internal(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_unspecified()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
                || o[0] >= 240
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
        }
    }
}

impl EgressPolicy {
    /// Whether a job may reach `addr`.
    pub fn permits(&self, addr: SocketAddr) -> bool {
        if self
            .deny
            .iter()
            .any(|d| d.ip() == addr.ip() && d.port() == addr.port())
        {
            return false;
        }
        !internal(addr.ip()) || self.allow.iter().any(|c| c.contains(addr.ip()))
    }
}

/// A running relay for one job; stops (and cuts its connections) when dropped.
pub struct Relay {
    listener: Arc<TcpListener>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(listener: TcpListener, policy: Arc<EgressPolicy>) -> Relay {
        let listener = Arc::new(listener);
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (l, c) = (listener.clone(), conns.clone());
        let accept = std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(stream) = stream else { break };
                if let (Ok(mut all), Ok(clone)) = (c.lock(), stream.try_clone()) {
                    all.push(clone);
                }
                let (policy, conns) = (policy.clone(), c.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &policy, &conns);
                });
            }
        });
        Relay {
            listener,
            conns,
            accept: Some(accept),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // shutdown() on a listening socket wakes a blocked accept().
        // SAFETY: plain syscall on a socket fd this relay owns.
        unsafe {
            libc::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*self.listener),
                libc::SHUT_RDWR,
            );
        }
        if let Ok(conns) = self.conns.lock() {
            for c in conns.iter() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn reply(client: &mut TcpStream, status: &str, why: &str) -> io::Result<()> {
    write!(
        client,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}\n",
        why.len() + 1
    )
}

/// Read the request head; returns (head, bytes read past it).
fn read_head(client: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    client.set_read_timeout(Some(HEAD_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            client.set_read_timeout(None)?;
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > HEAD_LIMIT {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
}

/// `host:port` split, with IPv6 literals in brackets.
fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        return Some((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((s.to_owned(), default_port)),
    }
}

fn serve(
    mut client: TcpStream,
    policy: &EgressPolicy,
    conns: &Mutex<Vec<TcpStream>>,
) -> io::Result<()> {
    let (head, rest) = read_head(&mut client)?;
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split_whitespace();
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("HTTP/1.1"),
    );
    let connect = method.eq_ignore_ascii_case("CONNECT");
    let (authority, path) = if connect {
        (target.to_owned(), String::new())
    } else if let Some(after) = target.strip_prefix("http://") {
        match after.find('/') {
            Some(i) => (after[..i].to_owned(), after[i..].to_owned()),
            None => (after.to_owned(), "/".to_owned()),
        }
    } else {
        return reply(
            &mut client,
            "400 Bad Request",
            "sandq egress: send CONNECT or an absolute http:// URI",
        );
    };
    let Some((host, port)) = split_host_port(&authority, if connect { 443 } else { 80 }) else {
        return reply(
            &mut client,
            "400 Bad Request",
            "sandq egress: bad host:port",
        );
    };

    // Resolve and check every address; connect only to a checked one.
    let addrs: Vec<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) if policy.upstream.is_some() => Vec::new(),
        Err(_) => {
            return reply(
                &mut client,
                "502 Bad Gateway",
                "sandq egress: cannot resolve host",
            )
        }
    };
    if addrs.iter().any(|a| !policy.permits(*a)) {
        return reply(
            &mut client,
            "403 Forbidden",
            &format!("sandq egress: {host}:{port} is not an allowed destination"),
        );
    }
    let upstream_stream = match &policy.upstream {
        Some(proxy) => {
            let addr = proxy
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| io::Error::other("upstream proxy does not resolve"))?;
            TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        }
        None => match addrs.first() {
            Some(a) => TcpStream::connect_timeout(a, CONNECT_TIMEOUT),
            None => Err(io::ErrorKind::NotFound.into()),
        },
    };
    let mut server = match upstream_stream {
        Ok(s) => s,
        Err(e) => {
            return reply(
                &mut client,
                "502 Bad Gateway",
                &format!("sandq egress: {e}"),
            )
        }
    };
    if let (Ok(mut all), Ok(clone)) = (conns.lock(), server.try_clone()) {
        all.push(clone);
    }

    if policy.upstream.is_some() {
        // The upstream proxy gets the request exactly as the job sent it.
        server.write_all(head.as_bytes())?;
    } else if connect {
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    } else {
        // Origin form for the server; one request per connection, so that a
        // kept-alive connection can never be reused for another host.
        let mut out = format!("{method} {path} {version}\r\n");
        for line in lines.filter(|l| !l.is_empty()) {
            let name = line.split(':').next().unwrap_or_default().trim();
            if name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("proxy-connection")
            {
                continue;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("Connection: close\r\n\r\n");
        server.write_all(out.as_bytes())?;
    }
    server.write_all(&rest)?;
    pipe(client, server)
}

/// Copy both ways until both sides are done.
fn pipe(client: TcpStream, server: TcpStream) -> io::Result<()> {
    let (mut c_read, mut s_write) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let _ = io::copy(&mut s_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let p = EgressPolicy::default();
        for a in [
            "127.0.0.1:6379",
            "10.0.0.1:80",
            "192.168.1.1:443",
            "169.254.169.254:80",
            "[::1]:80",
            "[fe80::1]:80",
            "100.64.0.1:80",
            "0.0.0.0:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(!p.permits(a.parse().unwrap()), "{a}");
        }
        assert!(p.permits("93.184.216.34:443".parse().unwrap()));
        let p = EgressPolicy {
            allow: vec![Cidr::parse("127.0.0.0/8").unwrap()],
            deny: vec!["127.0.0.1:6379".parse().unwrap()],
            ..Default::default()
        };
        assert!(p.permits("127.0.0.1:8080".parse().unwrap()));
        assert!(
            !p.permits("127.0.0.1:6379".parse().unwrap()),
            "the worker's Redis, always"
        );
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
    }

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("example.com:8443", 443),
            Some(("example.com".into(), 8443))
        );
        assert_eq!(
            split_host_port("example.com", 80),
            Some(("example.com".into(), 80))
        );
        assert_eq!(split_host_port("[::1]:80", 443), Some(("::1".into(), 80)));
    }
}
