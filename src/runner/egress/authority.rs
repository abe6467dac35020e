//! The destination a request names, normalised, or refused when it does not
//! parse cleanly.
//!
//! The relay decides on addresses, not on text, so this module's job is to
//! turn the job's text into a host that the worker will resolve itself: an IP
//! address or a plain DNS name, and a port. Anything that another parser (a
//! resolver, an upstream proxy) could read differently is refused rather
//! than guessed at: user information (`u@host`), IPv6 zone ids, IPvFuture,
//! percent-encoded bytes that are not name characters (`%09`, `%00`), and
//! the numeric forms `inet_aton` accepts (`2130706433`, `0x7f.1`,
//! `017700000001`, `127.1`): an IPv4 address must be four decimal numbers.
//! What is normalised: letter case, one trailing dot, percent-encoded name
//! characters, the brackets of an IPv6 literal.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A host to resolve on the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// Lower case, no trailing dot, only letters, digits, `-`, `_` and `.`.
    Name(String),
}

/// `host:port`, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("only http:// URIs are relayed as requests; use CONNECT for https and other schemes")]
    Scheme,
    #[error("the request target must be an absolute http:// URI, or host:port for CONNECT")]
    NotAbsolute,
    #[error("user information (user@) is not accepted in a destination")]
    Userinfo,
    #[error("the destination has no host")]
    EmptyHost,
    #[error("CONNECT needs host:port")]
    MissingPort,
    #[error("the port must be a number from 1 to 65535")]
    BadPort,
    #[error("bad percent-encoding in the host")]
    BadPercent,
    #[error("a host name may hold only letters, digits, '-', '_' and '.' (punycode for others)")]
    BadChar,
    #[error("the host name is too long or has an empty label")]
    BadName,
    #[error("an IPv4 address must be written as four decimal numbers, a.b.c.d")]
    NonCanonicalIpv4,
    #[error("bad IPv6 literal")]
    BadIpv6,
    #[error("IPv6 zone ids are not accepted")]
    ZoneId,
    #[error("a request target may not have a #fragment")]
    Fragment,
}

use AuthorityError as E;

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl Authority {
    /// The value of a `Host` header naming this target: the port only when
    /// it is not HTTP's 80.
    pub fn host_header(&self) -> String {
        let full = self.to_string();
        match self.port {
            80 => full[..full.len() - ":80".len()].to_owned(),
            _ => full,
        }
    }

    /// The target of a `CONNECT`: `host:port`, the port required.
    pub fn from_connect(target: &str) -> Result<Authority, AuthorityError> {
        parse(target, None)
    }

    /// An absolute-form target, `http://host[:port][/path][?query]`: the
    /// authority, and the path in origin form (`/` when empty).
    pub fn from_absolute(target: &str) -> Result<(Authority, String), AuthorityError> {
        let (scheme, rest) = target.split_once("://").ok_or(E::NotAbsolute)?;
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(E::Scheme);
        }
        if target.contains('#') {
            return Err(E::Fragment);
        }
        // The authority ends at the first '/' or '?' (RFC 3986 3.2), so in
        // `http://a.example?@b.example/` the host is a.example.
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = parse(authority, Some(80))?;
        let path = if tail.starts_with('/') {
            tail.to_owned()
        } else {
            format!("/{tail}")
        };
        Ok((authority, path))
    }
}

fn parse(s: &str, default_port: Option<u16>) -> Result<Authority, AuthorityError> {
    if s.contains('@') {
        return Err(E::Userinfo);
    }
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (literal, after) = rest.split_once(']').ok_or(E::BadIpv6)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(E::BadIpv6)?),
            };
            (Host::Ip(IpAddr::V6(ipv6_literal(literal)?)), port)
        }
        None => match s.rsplit_once(':') {
            Some((h, p)) => (name_or_ipv4(h)?, Some(p)),
            None => (name_or_ipv4(s)?, None),
        },
    };
    let port = match port {
        Some(p) => parse_port(p)?,
        None => default_port.ok_or(E::MissingPort)?,
    };
    Ok(Authority { host, port })
}

fn parse_port(p: &str) -> Result<u16, AuthorityError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(E::BadPort);
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(E::BadPort),
        Ok(port) => Ok(port),
    }
}

fn ipv6_literal(s: &str) -> Result<Ipv6Addr, AuthorityError> {
    if s.contains('%') {
        // RFC 6874 `fe80::1%25eth0`: a zone picks an interface of the
        // worker, never something a job should choose.
        return Err(E::ZoneId);
    }
    s.parse().map_err(|_| E::BadIpv6)
}

fn name_or_ipv4(s: &str) -> Result<Host, AuthorityError> {
    let mut name = percent_decode(s)?;
    if !name
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(E::BadChar);
    }
    name.make_ascii_lowercase();
    if name.last() == Some(&b'.') {
        name.pop();
    }
    if name.is_empty() {
        return Err(E::EmptyHost);
    }
    // Only ASCII is left, so this cannot fail.
    let name = String::from_utf8(name).map_err(|_| E::BadChar)?;
    if name.len() > 253 || name.split('.').any(|l| l.is_empty() || l.len() > 63) {
        return Err(E::BadName);
    }
    // A name whose last label is a number is an IPv4 address to every
    // resolver (WHATWG URL, inet_aton): accept only the one unambiguous form.
    let last = name.rsplit('.').next().unwrap_or_default();
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return name
            .parse::<Ipv4Addr>()
            .map(|v4| Host::Ip(IpAddr::V4(v4)))
            .map_err(|_| E::NonCanonicalIpv4);
    }
    Ok(Host::Name(name))
}

fn percent_decode(s: &str) -> Result<Vec<u8>, AuthorityError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(E::BadPercent)?;
            let hex = std::str::from_utf8(hex).map_err(|_| E::BadPercent)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(E::BadPercent);
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| E::BadPercent)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str, port: u16) -> Authority {
        Authority {
            host: Host::Ip(s.parse().unwrap()),
            port,
        }
    }

    fn name(s: &str, port: u16) -> Authority {
        Authority {
            host: Host::Name(s.into()),
            port,
        }
    }

    #[test]
    fn connect_targets_normalise() {
        let ok = |t: &str| Authority::from_connect(t);
        assert_eq!(ok("example.com:443"), Ok(name("example.com", 443)));
        assert_eq!(ok("EXAMPLE.Com.:443"), Ok(name("example.com", 443)));
        assert_eq!(ok("127.0.0.1.:6379"), Ok(ip("127.0.0.1", 6379)));
        assert_eq!(ok("localhost.:6379"), Ok(name("localhost", 6379)));
        assert_eq!(ok("%6cocalhost:6379"), Ok(name("localhost", 6379)));
        assert_eq!(ok("127%2e0%2e0%2e1:6379"), Ok(ip("127.0.0.1", 6379)));
        assert_eq!(ok("[::1]:443"), Ok(ip("::1", 443)));
        assert_eq!(ok("[::FFFF:127.0.0.1]:80"), Ok(ip("::ffff:7f00:1", 80)));
        assert_eq!(
            ok("_srv.example.com:08080"),
            Ok(name("_srv.example.com", 8080))
        );
        assert_eq!(
            ok("xn--bcher-kva.example:443"),
            Ok(name("xn--bcher-kva.example", 443))
        );
    }

    #[test]
    fn connect_targets_refused() {
        let cases: &[(&str, AuthorityError)] = &[
            ("u@127.0.0.1:6379", E::Userinfo),
            ("u:p@example.com:443", E::Userinfo),
            ("127.0.0.1%09:6379", E::BadChar),
            ("127.0.0.1%00:6379", E::BadChar),
            ("exa%20mple.com:443", E::BadChar),
            ("exa mple.com:443", E::BadChar),
            ("ex\0ample.com:443", E::BadChar),
            ("bücher.example:443", E::BadChar),
            ("example.com%:443", E::BadPercent),
            ("example.com%2:443", E::BadPercent),
            ("example.com%zz:443", E::BadPercent),
            ("example.com", E::MissingPort),
            ("example.com:", E::BadPort),
            ("example.com:0", E::BadPort),
            ("example.com:65536", E::BadPort),
            ("example.com:+80", E::BadPort),
            ("example.com:123456", E::BadPort),
            ("example.com:80 ", E::BadPort),
            (":443", E::EmptyHost),
            (".:443", E::EmptyHost),
            ("a..b:443", E::BadName),
            (".example.com:443", E::BadName),
            ("example.com..:443", E::BadName),
            ("2130706433:6379", E::NonCanonicalIpv4),
            ("0x7f.1:6379", E::NonCanonicalIpv4),
            ("0x7f000001:6379", E::NonCanonicalIpv4),
            ("017700000001:6379", E::NonCanonicalIpv4),
            ("0177.0.0.1:6379", E::NonCanonicalIpv4),
            ("127.0.0.01:6379", E::NonCanonicalIpv4),
            ("127.1:6379", E::NonCanonicalIpv4),
            ("1.2.3.4.5:80", E::NonCanonicalIpv4),
            ("256.0.0.1:80", E::NonCanonicalIpv4),
            ("::1:443", E::BadChar),
            ("[fe80::1%25eth0]:80", E::ZoneId),
            ("[fe80::1%eth0]:80", E::ZoneId),
            ("[v1.fe80::1]:80", E::BadIpv6),
            ("[::1", E::BadIpv6),
            ("[::1]x:80", E::BadIpv6),
            ("[127.0.0.1]:80", E::BadIpv6),
        ];
        for (target, err) in cases {
            assert_eq!(
                Authority::from_connect(target).as_ref(),
                Err(err),
                "{target:?}"
            );
        }
        let long = format!("{}.com:443", "a".repeat(64));
        assert_eq!(Authority::from_connect(&long), Err(E::BadName));
    }

    #[test]
    fn absolute_uris() {
        let abs = |t: &str| Authority::from_absolute(t);
        assert_eq!(
            abs("http://example.com/a?b=c"),
            Ok((name("example.com", 80), "/a?b=c".into()))
        );
        assert_eq!(
            abs("HTTP://Example.com:8080"),
            Ok((name("example.com", 8080), "/".into()))
        );
        assert_eq!(
            abs("http://example.com?x"),
            Ok((name("example.com", 80), "/?x".into()))
        );
        assert_eq!(
            abs("http://a.example?@127.0.0.1/"),
            Ok((name("a.example", 80), "/?@127.0.0.1/".into())),
            "the authority ends at '?'"
        );
        assert_eq!(abs("http://[::1]:81/x"), Ok((ip("::1", 81), "/x".into())));
        assert_eq!(abs("https://example.com/"), Err(E::Scheme));
        assert_eq!(abs("ftp://example.com/"), Err(E::Scheme));
        assert_eq!(abs("/relative"), Err(E::NotAbsolute));
        assert_eq!(abs("example.com:80"), Err(E::NotAbsolute));
        assert_eq!(abs("http://u@127.0.0.1:6379/"), Err(E::Userinfo));
        assert_eq!(abs("http://a.example\\@127.0.0.1/"), Err(E::Userinfo));
        assert_eq!(abs("http://example.com/#frag"), Err(E::Fragment));
        assert_eq!(abs("http:///path"), Err(E::EmptyHost));
        assert_eq!(abs("http://:80/"), Err(E::EmptyHost));
        assert_eq!(abs("http://example.com:0/"), Err(E::BadPort));
        assert_eq!(abs("http://2130706433/"), Err(E::NonCanonicalIpv4));
    }

    #[test]
    fn authorities_print_with_their_port() {
        assert_eq!(name("example.com", 80).to_string(), "example.com:80");
        assert_eq!(name("example.com", 80).host_header(), "example.com");
        assert_eq!(name("example.com", 8080).host_header(), "example.com:8080");
        assert_eq!(ip("::1", 80).host_header(), "[::1]");
        assert_eq!(ip("::1", 443).to_string(), "[::1]:443");
    }
}
