//! One relay connection: one request head, one decision, one destination.
//!
//! The head is read (up to [`HEAD_LIMIT`] bytes, within [`HEAD_TIMEOUT`] in
//! all, so a slow sender cannot hold a connection open by trickling) and
//! parsed with `httparse`; anything it refuses is answered `400`. The target
//! must be `CONNECT host:port` or an absolute `http://` URI; its authority is
//! normalised ([`super::authority`]), resolved here, and every address
//! checked ([`super::policy`]). The connection then goes to the first checked
//! address that answers or, with an upstream proxy, to the proxy, which is
//! given that checked address as the authority (`CONNECT 93.184.216.34:443`,
//! `GET http://93.184.216.34:80/path` with the job's `Host` header kept): a
//! proxy that resolved the name again could be answered differently.
//!
//! After a `CONNECT` is established the tunnel carries opaque bytes, bound to
//! the checked destination. A plain HTTP request is relayed alone: it goes
//! out with `Connection: close`, its body framed by its one `Content-Length`
//! (a `Transfer-Encoding` body is refused with `411`, so that no peer can
//! frame it differently), the final response head comes back with
//! `Connection: close`, and whatever the job sends after the body (a second,
//! pipelined or kept-alive request) is read and dropped, never forwarded. So
//! every request that reaches a destination or the upstream proxy is one
//! this module parsed and checked.

use super::authority::{Authority, Host};
use super::policy::{reaches, Denied, EgressPolicy};
use super::{Slot, MAX_CONNECTIONS};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request head accepted.
const HEAD_LIMIT: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Largest response head relayed (servers send many cookies).
const RESPONSE_HEAD_LIMIT: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
/// For the whole request head, not per read.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_ATTEMPTS: usize = 3;
/// For the upstream proxy's answer to CONNECT (it connects meanwhile).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused connection is read (and dropped) after the answer,
/// so that closing it does not reset it before the job has read the answer.
const LINGER: Duration = Duration::from_secs(2);
/// How much the job may send after its request before the relay stops
/// reading and just closes.
const DRAIN_LIMIT: u64 = 1024 * 1024;
/// A copying thread needs little more than its 8 KiB buffer.
const COPY_STACK: usize = 64 * 1024;

/// Headers that describe one hop, not the request (RFC 9110 7.6.1); the
/// relay writes its own `Host`, `Content-Length` and `Connection`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "content-length",
];

/// Why the relay answers a request itself; each is said to the job with an
/// HTTP status and this text.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    #[error("the request head does not parse: {0}")]
    BadHead(String),
    #[error("the request head is over {HEAD_LIMIT} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("no complete request head within {} s", HEAD_TIMEOUT.as_secs())]
    HeadTimeout,
    #[error(transparent)]
    Authority(#[from] super::authority::AuthorityError),
    #[error("more than one Host header")]
    RepeatedHost,
    #[error("bad or repeated Content-Length")]
    ContentLength,
    #[error("request bodies with Transfer-Encoding are not relayed; send Content-Length")]
    TransferEncoding,
    #[error("{0} is not an allowed destination ({1})")]
    Forbidden(String, Denied),
    #[error("cannot resolve {0}")]
    Unresolved(String),
    #[error("cannot connect to {0}: {1}")]
    Unreachable(String, io::Error),
    #[error("the upstream proxy answered CONNECT {0} with status {1}")]
    UpstreamRefused(SocketAddr, u16),
    #[error("the upstream proxy's answer to CONNECT {0} does not parse")]
    UpstreamGarbled(SocketAddr),
    #[error("the destination closed without a valid response head")]
    NoResponse,
    #[error("this job holds {MAX_CONNECTIONS} relay connections already; close one first")]
    TooManyConnections,
    #[error("the relay has no thread to spare; try again")]
    Busy,
}

impl Refusal {
    fn status(&self) -> &'static str {
        use Refusal::*;
        match self {
            BadHead(_) | Authority(_) | RepeatedHost | ContentLength => "400 Bad Request",
            HeadTooLarge => "431 Request Header Fields Too Large",
            HeadTimeout => "408 Request Timeout",
            TransferEncoding => "411 Length Required",
            Forbidden(..) => "403 Forbidden",
            Unresolved(_) | Unreachable(..) | UpstreamRefused(..) | UpstreamGarbled(_)
            | NoResponse => "502 Bad Gateway",
            TooManyConnections => "429 Too Many Requests",
            Busy => "503 Service Unavailable",
        }
    }
}

/// The whole answer to a refused request.
pub(super) fn reply_text(refusal: &Refusal) -> String {
    let why = format!("sandq egress: {refusal}\n");
    format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}",
        refusal.status(),
        why.len()
    )
}

/// Serve one accepted connection to its end. `slot` holds its place among
/// the job's open connections until this returns.
pub(super) fn serve(slot: Slot, client: Arc<TcpStream>) {
    let _ = client.set_nodelay(true);
    let outcome = route(&slot, &client).and_then(|route| match route {
        Some(route) => route.start(&client),
        None => Ok(None),
    });
    match outcome {
        Ok(Some(forward)) => forward.run(&client),
        Ok(None) => {}
        Err(refusal) => {
            tracing::debug!(%refusal, "egress relay: refused");
            let _ = (&*client).write_all(reply_text(&refusal).as_bytes());
            linger(&client);
        }
    }
}

/// A request, parsed and checked, and its destination, connected.
struct Route {
    request: Request,
    /// Bytes the job sent after the head.
    leftover: Vec<u8>,
    server: Arc<TcpStream>,
    /// The checked address: connected to, or named to the upstream proxy.
    dest: SocketAddr,
    upstream: bool,
}

/// What is left once the request is on its way: copying.
enum Forward {
    Tunnel {
        server: Arc<TcpStream>,
    },
    Http {
        server: Arc<TcpStream>,
        body_left: u64,
    },
}

fn route(slot: &Slot, client: &TcpStream) -> Result<Option<Route>, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let parse =
        |b: &[u8]| httparse::Request::new(&mut [httparse::EMPTY_HEADER; MAX_HEADERS]).parse(b);
    let len = match read_head(client, &mut buf, HEAD_LIMIT, Some(deadline), parse) {
        Ok(len) => len,
        // The job went away before asking anything.
        Err(HeadError::Gone) => return Ok(None),
        Err(HeadError::Timeout) => return Err(Refusal::HeadTimeout),
        Err(HeadError::TooLarge | HeadError::Parse(httparse::Error::TooManyHeaders)) => {
            return Err(Refusal::HeadTooLarge)
        }
        Err(HeadError::Parse(e)) => return Err(Refusal::BadHead(e.to_string())),
    };
    let _ = client.set_read_timeout(None);
    let leftover = buf.split_off(len);
    let request = Request::parse(&buf)?;
    let proxy = upstream_addrs(slot.policy())?;
    let addrs = resolve_checked(
        slot.policy(),
        request.authority(),
        proxy.as_deref().unwrap_or_default(),
    )?;
    let (server, dest) = connect(request.authority(), &addrs, proxy.as_deref())?;
    let server = Arc::new(server);
    if !slot.adopt(&server) {
        // The job ended meanwhile.
        return Ok(None);
    }
    let _ = server.set_nodelay(true);
    Ok(Some(Route {
        request,
        leftover,
        server,
        dest,
        upstream: slot.policy().upstream.is_some(),
    }))
}

fn upstream_addrs(policy: &EgressPolicy) -> Result<Option<Vec<SocketAddr>>, Refusal> {
    let Some(proxy) = &policy.upstream else {
        return Ok(None);
    };
    let addrs: Vec<SocketAddr> = proxy
        .to_socket_addrs()
        .map_err(|e| Refusal::Unreachable("the upstream proxy".into(), e))?
        .collect();
    if addrs.is_empty() {
        let e = io::ErrorKind::NotFound.into();
        return Err(Refusal::Unreachable("the upstream proxy".into(), e));
    }
    Ok(Some(addrs))
}

/// Resolve on the worker and check every address: one forbidden address
/// refuses the name (the resolver's order is not the job's to choose). The
/// upstream proxy itself is no destination.
fn resolve_checked(
    policy: &EgressPolicy,
    a: &Authority,
    proxy: &[SocketAddr],
) -> Result<Vec<SocketAddr>, Refusal> {
    let addrs: Vec<SocketAddr> = match &a.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, a.port)],
        Host::Name(name) => (name.as_str(), a.port)
            .to_socket_addrs()
            .map_err(|_| Refusal::Unresolved(a.to_string()))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Refusal::Unresolved(a.to_string()));
    }
    for addr in &addrs {
        let checked = if proxy.iter().any(|p| reaches(*addr, *p)) {
            Err(Denied::UpstreamProxy(*addr))
        } else {
            policy.check(*addr)
        };
        checked.map_err(|denied| Refusal::Forbidden(a.to_string(), denied))?;
    }
    Ok(addrs)
}

/// Connect to the first checked address that answers or, with an upstream
/// proxy, to the proxy (which is then told the first checked address). A
/// few addresses at most: each may take the whole connect timeout.
fn connect(
    a: &Authority,
    addrs: &[SocketAddr],
    proxy: Option<&[SocketAddr]>,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let targets = proxy.unwrap_or(addrs);
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for target in targets.iter().take(CONNECT_ATTEMPTS) {
        match TcpStream::connect_timeout(target, CONNECT_TIMEOUT) {
            Ok(stream) if proxy.is_some() => return Ok((stream, addrs[0])),
            Ok(stream) => return Ok((stream, *target)),
            Err(e) => last = e,
        }
    }
    let named = match proxy {
        Some(_) => "the upstream proxy".to_owned(),
        None => a.to_string(),
    };
    Err(Refusal::Unreachable(named, last))
}

impl Route {
    /// Send the request on (for CONNECT upstream: have the proxy connect),
    /// answer the job where the relay speaks for the destination.
    fn start(self, client: &TcpStream) -> Result<Option<Forward>, Refusal> {
        let Route {
            request,
            leftover,
            server,
            dest,
            upstream,
        } = self;
        let lost = |e| Refusal::Unreachable(dest.to_string(), e);
        match &request.target {
            Target::Connect(_) => {
                let mut early = Vec::new();
                if upstream {
                    write!(&*server, "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n")
                        .map_err(lost)?;
                    early = upstream_connect_answer(&server, dest)?;
                }
                // Past this point the job is told the tunnel is up.
                let sent = (&*client)
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .and_then(|()| (&*client).write_all(&early))
                    .and_then(|()| (&*server).write_all(&leftover));
                Ok(sent.ok().map(|()| Forward::Tunnel { server }))
            }
            Target::Http { .. } => {
                (&*server)
                    .write_all(&request.head_for(dest, upstream))
                    .map_err(lost)?;
                // Bytes after the body (a pipelined request) are dropped.
                let now = leftover
                    .len()
                    .min(usize::try_from(request.body_len).unwrap_or(usize::MAX));
                let sent = (&*server).write_all(&leftover[..now]);
                Ok(sent.ok().map(|()| Forward::Http {
                    server,
                    body_left: request.body_len - now as u64,
                }))
            }
        }
    }
}

/// Read the upstream proxy's answer to CONNECT: a 2xx head, and returns
/// what the destination already sent after it.
fn upstream_connect_answer(server: &TcpStream, dest: SocketAddr) -> Result<Vec<u8>, Refusal> {
    let mut buf = Vec::new();
    let deadline = Some(Instant::now() + UPSTREAM_TIMEOUT);
    let len = read_head(
        server,
        &mut buf,
        RESPONSE_HEAD_LIMIT,
        deadline,
        parse_response,
    )
    .map_err(|_| Refusal::UpstreamGarbled(dest))?;
    match response_head(&buf[..len]) {
        Some((code, _)) if (200..300).contains(&code) => {
            let _ = server.set_read_timeout(None);
            Ok(buf.split_off(len))
        }
        Some((code, _)) => Err(Refusal::UpstreamRefused(dest, code)),
        None => Err(Refusal::UpstreamGarbled(dest)),
    }
}

impl Forward {
    fn run(self, client: &Arc<TcpStream>) {
        match self {
            Forward::Tunnel { server } => {
                let up = {
                    let (from, to) = (client.clone(), server.clone());
                    spawn_copy(move || {
                        let _ = io::copy(&mut &*from, &mut &*to);
                        let _ = to.shutdown(Shutdown::Write);
                    })
                };
                let Ok(up) = up else { return };
                let _ = io::copy(&mut &*server, &mut &**client);
                let _ = client.shutdown(Shutdown::Write);
                let _ = up.join();
            }
            Forward::Http { server, body_left } => {
                let up = {
                    let (from, to) = (client.clone(), server.clone());
                    spawn_copy(move || {
                        let _ = io::copy(&mut (&*from).take(body_left), &mut &*to);
                        // Anything after the body is not for the destination.
                        let _ = io::copy(&mut (&*from).take(DRAIN_LIMIT), &mut io::sink());
                    })
                };
                let Ok(up) = up else { return };
                if let Err(refusal) = relay_response(&server, client) {
                    let _ = (&**client).write_all(reply_text(&refusal).as_bytes());
                }
                let _ = client.shutdown(Shutdown::Write);
                let _ = server.shutdown(Shutdown::Both);
                let _ = up.join();
            }
        }
    }
}

fn spawn_copy(f: impl FnOnce() + Send + 'static) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("egress-copy".into())
        .stack_size(COPY_STACK)
        .spawn(f)
}

/// Copy the destination's response to the job, each head rewritten to end
/// the connection after it. A refusal means nothing was sent to the job yet.
fn relay_response(server: &TcpStream, client: &TcpStream) -> Result<(), Refusal> {
    let mut buf = Vec::new();
    let mut answered = false;
    loop {
        let head = read_head(server, &mut buf, RESPONSE_HEAD_LIMIT, None, parse_response)
            .ok()
            .and_then(|len| Some((len, response_head(&buf[..len])?)));
        let Some((len, (code, head))) = head else {
            return if answered {
                Ok(())
            } else {
                Err(Refusal::NoResponse)
            };
        };
        answered = true;
        if (&*client).write_all(&head).is_err() {
            return Ok(());
        }
        buf.drain(..len);
        // 1xx heads (100 Continue) come before the final one.
        if code >= 200 || code == 101 {
            break;
        }
    }
    if (&*client).write_all(&buf).is_ok() {
        let _ = io::copy(&mut &*server, &mut &*client);
    }
    Ok(())
}

fn response_config() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config
        .allow_spaces_after_header_name_in_responses(true)
        .allow_multiple_spaces_in_response_status_delimiters(true);
    config
}

fn parse_response(b: &[u8]) -> httparse::Result<usize> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    response_config().parse_response(&mut httparse::Response::new(&mut headers), b)
}

/// A response head as the job gets it: without the destination's
/// connection headers, and with `Connection: close` on a final one.
fn response_head(head: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    response_config().parse_response(&mut r, head).ok()?;
    let (code, minor) = (r.code?, r.version?);
    let mut out = Vec::with_capacity(head.len() + 24);
    let _ = write!(out, "HTTP/1.{minor} {code} {}\r\n", r.reason.unwrap_or(""));
    for h in r.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if !matches!(
            name.as_str(),
            "connection" | "keep-alive" | "proxy-connection"
        ) {
            push_header(&mut out, h.name, h.value);
        }
    }
    if code >= 200 {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some((code, out))
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// After a refusal: stop sending, and read (dropping) what the job still
/// sends for a moment, so that closing does not reset the connection before
/// the job has read the answer.
fn linger(client: &TcpStream) {
    let _ = client.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0u64;
    while drained < DRAIN_LIMIT {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || client.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*client).read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n as u64,
        }
    }
}

enum HeadError {
    /// The peer closed, or the socket failed.
    Gone,
    TooLarge,
    Timeout,
    Parse(httparse::Error),
}

/// Read from `stream` until `buf` holds a complete head (as `parse` sees
/// it); returns the head's length. Parsing is tried only once an empty line
/// has arrived, so a head that trickles in byte by byte costs linear time.
fn read_head(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    limit: usize,
    deadline: Option<Instant>,
    parse: impl Fn(&[u8]) -> httparse::Result<usize>,
) -> Result<usize, HeadError> {
    let mut scanned = 0;
    let mut partial = 0;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(at) = blank_line(&buf[scanned..]) {
            match parse(buf) {
                Ok(httparse::Status::Complete(len)) => return Ok(len),
                // Empty lines before a request line are skipped by the
                // parser (RFC 9112 2.2): look further, a few times.
                Ok(httparse::Status::Partial) if partial < 4 => {
                    partial += 1;
                    scanned += at + 1;
                }
                Ok(httparse::Status::Partial) => {
                    return Err(HeadError::Parse(httparse::Error::NewLine))
                }
                Err(e) => return Err(HeadError::Parse(e)),
            }
            continue;
        }
        scanned = buf.len().saturating_sub(2);
        if buf.len() >= limit {
            return Err(HeadError::TooLarge);
        }
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HeadError::Timeout);
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|_| HeadError::Gone)?;
        }
        let want = (limit - buf.len()).min(chunk.len());
        match (&*stream).read(&mut chunk[..want]) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Timeout)
            }
            Err(_) => return Err(HeadError::Gone),
        }
    }
}

/// Where an empty line starts in `hay` (`\n\n` or `\n\r\n`).
fn blank_line(hay: &[u8]) -> Option<usize> {
    (0..hay.len()).find(|&i| {
        hay[i] == b'\n' && (hay[i + 1..].starts_with(b"\n") || hay[i + 1..].starts_with(b"\r\n"))
    })
}

/// What the job asked for.
enum Target {
    Connect(Authority),
    Http { authority: Authority, path: String },
}

/// A request head, parsed and checked.
struct Request {
    method: String,
    minor: u8,
    target: Target,
    /// End-to-end headers, in order, to pass on.
    headers: Vec<(String, Vec<u8>)>,
    content_length: Option<u64>,
    body_len: u64,
}

impl Request {
    fn parse(head: &[u8]) -> Result<Request, Refusal> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut headers);
        r.parse(head).map_err(|e| Refusal::BadHead(e.to_string()))?;
        let (Some(method), Some(target), Some(minor)) = (r.method, r.path, r.version) else {
            return Err(Refusal::BadHead("incomplete".into()));
        };
        let connect = method == "CONNECT";
        let target = if connect {
            Target::Connect(Authority::from_connect(target)?)
        } else {
            let (authority, path) = Authority::from_absolute(target)?;
            Target::Http { authority, path }
        };
        let mut request = Request {
            method: method.to_owned(),
            minor,
            target,
            headers: Vec::new(),
            content_length: None,
            body_len: 0,
        };
        let mut listed: Vec<String> = Vec::new();
        let mut seen_host = false;
        for h in r.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            match name.as_str() {
                "transfer-encoding" if !connect => return Err(Refusal::TransferEncoding),
                "content-length" if !connect => {
                    if request.content_length.is_some() {
                        return Err(Refusal::ContentLength);
                    }
                    request.content_length = Some(content_length(h.value)?);
                }
                // A proxy ignores the job's Host and names the target itself
                // (RFC 9112, 3.2.2); two of them are refused as a server would.
                "host" if std::mem::replace(&mut seen_host, true) => {
                    return Err(Refusal::RepeatedHost)
                }
                "host" => {}
                "connection" => listed.extend(
                    String::from_utf8_lossy(h.value)
                        .split(',')
                        .map(|t| t.trim().to_ascii_lowercase()),
                ),
                _ if HOP_BY_HOP.contains(&name.as_str()) => {}
                _ => request.headers.push((h.name.to_owned(), h.value.to_vec())),
            }
        }
        // Headers that `Connection` names are hop-by-hop too.
        request
            .headers
            .retain(|(n, _)| !listed.contains(&n.to_ascii_lowercase()));
        request.body_len = request.content_length.unwrap_or(0);
        Ok(request)
    }

    fn authority(&self) -> &Authority {
        match &self.target {
            Target::Connect(a) | Target::Http { authority: a, .. } => a,
        }
    }

    /// The head sent on: origin form to the destination; absolute form with
    /// the checked address to an upstream proxy; `Host` is the target as the
    /// job named it.
    fn head_for(&self, dest: SocketAddr, upstream: bool) -> Vec<u8> {
        let Target::Http { authority, path } = &self.target else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(512);
        let _ = if upstream {
            write!(
                out,
                "{} http://{dest}{path} HTTP/1.{}\r\n",
                self.method, self.minor
            )
        } else {
            write!(out, "{} {path} HTTP/1.{}\r\n", self.method, self.minor)
        };
        for (name, value) in &self.headers {
            push_header(&mut out, name, value);
        }
        push_header(&mut out, "Host", authority.host_header().as_bytes());
        if let Some(len) = self.content_length {
            let _ = write!(out, "Content-Length: {len}\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out
    }
}

fn content_length(value: &[u8]) -> Result<u64, Refusal> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(Refusal::ContentLength);
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Refusal::ContentLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> Result<Request, Refusal> {
        Request::parse(head.as_bytes())
    }

    #[test]
    fn requests_are_framed_by_one_content_length() {
        let r = request("POST http://example.com/x HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!(r.body_len, 5);
        for bad in [
            "POST http://example.com/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST http://example.com/ HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST http://example.com/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST http://example.com/ HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST http://example.com/ HTTP/1.1\r\nContent-Length:\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(Refusal::ContentLength)),
                "{bad:?}"
            );
        }
        for te in [
            "POST http://example.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://example.com/ HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
        ] {
            assert!(matches!(request(te), Err(Refusal::TransferEncoding)), "{te:?}");
        }
        // Obsolete line folding and whitespace before the colon do not parse.
        for bad in [
            "GET http://example.com/ HTTP/1.1\r\nX-A: 1\r\n Content-Length: 5\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\nX-A: 1\rContent-Length: 5\r\n\r\n",
        ] {
            assert!(matches!(request(bad), Err(Refusal::BadHead(_))), "{bad:?}");
        }
    }

    #[test]
    fn the_target_names_the_host() {
        // Whatever Host the job sent, the one sent on names the target.
        for host in ["127.0.0.1:6379", "u@example.com", "localhost:3128"] {
            let r = request(&format!(
                "GET http://example.com/ HTTP/1.1\r\nHost: {host}\r\n\r\n"
            ))
            .unwrap();
            let head =
                String::from_utf8(r.head_for("93.184.216.34:80".parse().unwrap(), false)).unwrap();
            assert!(head.contains("\r\nHost: example.com\r\n"), "{head}");
            assert!(!head.contains(host), "{head}");
        }
        let twice =
            "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nHost: example.com\r\n\r\n";
        assert!(matches!(request(twice), Err(Refusal::RepeatedHost)));
    }

    #[test]
    fn the_head_sent_on_names_the_checked_address() {
        let r = request(
            "POST http://Example.com:8080/p?q HTTP/1.1\r\nHost: example.com:8080\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: 1\r\nKeep-Alive: 5\r\nProxy-Authorization: x\r\nAccept: */*\r\nContent-Length: 2\r\n\r\n",
        )
        .unwrap();
        let dest: SocketAddr = "93.184.216.34:8080".parse().unwrap();
        assert_eq!(
            String::from_utf8(r.head_for(dest, true)).unwrap(),
            "POST http://93.184.216.34:8080/p?q HTTP/1.1\r\nAccept: */*\r\nHost: example.com:8080\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n"
        );
        assert!(String::from_utf8(r.head_for(dest, false))
            .unwrap()
            .starts_with("POST /p?q HTTP/1.1\r\n"));
        let r = request("GET http://[2606:4700::1]/ HTTP/1.0\r\n\r\n").unwrap();
        let dest: SocketAddr = "[2606:4700::1]:80".parse().unwrap();
        assert_eq!(
            String::from_utf8(r.head_for(dest, true)).unwrap(),
            "GET http://[2606:4700::1]:80/ HTTP/1.0\r\nHost: [2606:4700::1]\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn targets_other_than_connect_and_http_uris_are_refused() {
        for bad in [
            "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "GET https://example.com/ HTTP/1.1\r\n\r\n",
            "connect example.com:443 HTTP/1.1\r\n\r\n",
            "CONNECT example.com HTTP/1.1\r\n\r\n",
            "CONNECT example.com:0 HTTP/1.1\r\n\r\n",
            "CONNECT http://example.com:443 HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(Refusal::Authority(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn final_response_heads_close_the_connection() {
        let (code, head) = response_head(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n",
        )
        .unwrap();
        assert_eq!(code, 200);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        );
        let (code, head) = response_head(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
        assert_eq!(
            (code, head.as_slice()),
            (100, &b"HTTP/1.1 100 Continue\r\n\r\n"[..])
        );
        assert!(response_head(b"garbage\r\n\r\n").is_none());
    }

    #[test]
    fn blank_lines_end_heads() {
        assert_eq!(blank_line(b"GET / HTTP/1.1\r\n\r\n"), Some(15));
        assert_eq!(blank_line(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(blank_line(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    /// glibc's resolver reads inet_aton forms as addresses; the normaliser
    /// refuses them, and were one to reach the resolver, the check on the
    /// resolved address would refuse it still.
    #[test]
    fn the_check_is_on_resolved_addresses() {
        let p = EgressPolicy::default();
        for numeric in ["2130706433", "0x7f.1", "017700000001", "127.1", "localhost"] {
            let a = Authority {
                host: Host::Name(numeric.into()),
                port: 6379,
            };
            let r = resolve_checked(&p, &a, &[]);
            assert!(matches!(r, Err(Refusal::Forbidden(..))), "{numeric}: {r:?}");
        }
        let a = Authority::from_connect("no-such-host.invalid:443").unwrap();
        assert!(matches!(
            resolve_checked(&p, &a, &[]),
            Err(Refusal::Unresolved(_))
        ));
    }

    #[test]
    fn the_upstream_proxy_is_no_destination() {
        // Even with its range allowed: through a tunnel to itself, the proxy
        // would take any request unchecked.
        let p = EgressPolicy {
            allow: vec![super::super::Cidr::parse("127.0.0.0/8").unwrap()],
            ..Default::default()
        };
        let proxy: SocketAddr = "127.0.0.1:3128".parse().unwrap();
        for target in ["127.0.0.1:3128", "[::ffff:127.0.0.1]:3128"] {
            let a = Authority::from_connect(target).unwrap();
            let r = resolve_checked(&p, &a, &[proxy]);
            assert!(
                matches!(r, Err(Refusal::Forbidden(_, Denied::UpstreamProxy(_)))),
                "{target}: {r:?}"
            );
        }
        let a = Authority::from_connect("127.0.0.1:3129").unwrap();
        assert!(resolve_checked(&p, &a, &[proxy]).is_ok());
    }

    #[test]
    fn refusals_say_why_with_a_status() {
        let text = reply_text(&Refusal::Forbidden(
            "127.0.0.1:6379".into(),
            Denied::OwnService("127.0.0.1:6379".parse().unwrap()),
        ));
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.ends_with(
            "\r\n\r\nsandq egress: 127.0.0.1:6379 is not an allowed destination (127.0.0.1:6379 is the worker's own service)\n"
        ));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(reply_text(&Refusal::TooManyConnections).starts_with("HTTP/1.1 429 "));
    }
}
