//! Which addresses a job may reach: the destination policy of the relay.
//!
//! An address is judged as it will be connected to, after resolution on the
//! worker. The rule, in order:
//!
//! 1. The worker's own Redis and metrics addresses are always refused, also
//!    when written as an IPv6 address that carries them (`::ffff:127.0.0.1`).
//! 2. An address in an operator's `--egress-allow` range is permitted; an
//!    IPv6 address that carries an IPv4 one is matched by that IPv4 too.
//! 3. Otherwise the special-purpose ranges decide ([`SPECIAL`]: the IANA IPv4
//!    and IPv6 Special-Purpose Address Registries, multicast, and the
//!    deprecated IPv6 ranges). An address in a range the registry does not mark
//!    "globally reachable" is refused; the most specific range wins. IPv6
//!    forms that carry an IPv4 address to a router that will unwrap it
//!    (IPv4-mapped, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged as
//!    that IPv4 address. Deprecated or local carriers (IPv4-compatible,
//!    IPv4-translated, local-use NAT64 `64:ff9b:1::/48`, Teredo) are refused
//!    whole: their embedding is not fixed or not meant to be reached.
//!
//! Everything else (public unicast) is permitted.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::LazyLock;

/// An `--egress-allow` range: `addr/prefix`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .ok()
            .map(Cidr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

/// Where jobs may connect.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// `host:port` of an operator's HTTP proxy that all traffic goes through.
    pub upstream: Option<String>,
    /// Ranges allowed even though they are internal.
    pub allow: Vec<Cidr>,
    /// Addresses never allowed (the worker's Redis and metrics). An
    /// unspecified address (`0.0.0.0:9090`, a service bound to every
    /// interface) refuses its port on every address.
    pub deny: Vec<SocketAddr>,
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("{0} is the worker's own service")]
    OwnService(SocketAddr),
    /// Through a tunnel to the proxy itself a job could ask it anything.
    #[error("{0} is the upstream proxy")]
    UpstreamProxy(SocketAddr),
    #[error("{0} is {1}")]
    Special(IpAddr, &'static str),
    #[error("{0} carries {1}, which is {2}")]
    Carries(Ipv6Addr, Ipv4Addr, &'static str),
}

/// What a special-purpose range means for a destination in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Refuse,
    /// "Globally reachable" in the registry, inside a refused range.
    Permit,
    /// Judge the IPv4 address this IPv6 range carries.
    Carries(Embedding),
}

/// Where an IPv6 range keeps its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Embedding {
    /// The last 32 bits (IPv4-mapped, NAT64 well-known prefix, RFC 6052).
    Low32,
    /// Bits 16..48 (6to4, RFC 3056).
    SixToFour,
}

use Embedding::*;
use Rule::*;

/// The special-purpose ranges, as data: block, name (said in refusals), rule.
/// From the IANA IPv4 and IPv6 Special-Purpose Address Registries (updated
/// 2025), where `Permit` is "Globally Reachable: True" and `Refuse` is every
/// other entry; plus multicast (its own registry) and the deprecated IPv6
/// ranges that no registry row covers.
const SPECIAL: &[(&str, &str, Rule)] = &[
    ("0.0.0.0/8", "\"this network\"", Refuse),
    ("0.0.0.0/32", "\"this host on this network\"", Refuse),
    ("10.0.0.0/8", "private-use", Refuse),
    ("100.64.0.0/10", "shared address space (CGNAT)", Refuse),
    ("127.0.0.0/8", "loopback", Refuse),
    ("169.254.0.0/16", "link-local (cloud metadata)", Refuse),
    ("172.16.0.0/12", "private-use", Refuse),
    ("192.0.0.0/24", "IETF protocol assignments", Refuse),
    ("192.0.0.0/29", "the IPv4 service continuity prefix", Refuse),
    ("192.0.0.8/32", "the IPv4 dummy address", Refuse),
    ("192.0.0.9/32", "PCP anycast", Permit),
    ("192.0.0.10/32", "TURN anycast", Permit),
    ("192.0.0.170/32", "NAT64/DNS64 discovery", Refuse),
    ("192.0.0.171/32", "NAT64/DNS64 discovery", Refuse),
    ("192.0.2.0/24", "documentation (TEST-NET-1)", Refuse),
    ("192.31.196.0/24", "AS112-v4", Permit),
    ("192.52.193.0/24", "AMT", Permit),
    ("192.88.99.0/24", "deprecated (6to4 relay anycast)", Refuse),
    ("192.88.99.2/32", "6a44 relay anycast", Refuse),
    ("192.168.0.0/16", "private-use", Refuse),
    ("192.175.48.0/24", "AS112 direct delegation", Permit),
    ("198.18.0.0/15", "benchmarking", Refuse),
    ("198.51.100.0/24", "documentation (TEST-NET-2)", Refuse),
    ("203.0.113.0/24", "documentation (TEST-NET-3)", Refuse),
    ("224.0.0.0/4", "multicast", Refuse),
    ("240.0.0.0/4", "reserved", Refuse),
    ("255.255.255.255/32", "limited broadcast", Refuse),
    ("::/128", "unspecified", Refuse),
    ("::1/128", "loopback", Refuse),
    ("::/96", "IPv4-compatible (deprecated)", Refuse),
    ("::ffff:0:0/96", "IPv4-mapped", Carries(Low32)),
    ("::ffff:0:0:0/96", "IPv4-translated (deprecated)", Refuse),
    ("64:ff9b::/96", "NAT64", Carries(Low32)),
    ("64:ff9b:1::/48", "local-use NAT64", Refuse),
    ("100::/64", "discard-only", Refuse),
    ("100:0:0:1::/64", "the dummy IPv6 prefix", Refuse),
    ("2001::/23", "IETF protocol assignments", Refuse),
    ("2001::/32", "Teredo", Refuse),
    ("2001:1::1/128", "PCP anycast", Permit),
    ("2001:1::2/128", "TURN anycast", Permit),
    ("2001:1::3/128", "DNS-SD SRP anycast", Permit),
    ("2001:2::/48", "benchmarking", Refuse),
    ("2001:3::/32", "AMT", Permit),
    ("2001:4:112::/48", "AS112-v6", Permit),
    ("2001:10::/28", "deprecated (ORCHID)", Refuse),
    ("2001:20::/28", "ORCHIDv2", Permit),
    ("2001:30::/28", "drone remote ID (DET)", Permit),
    ("2001:db8::/32", "documentation", Refuse),
    ("2002::/16", "6to4", Carries(SixToFour)),
    ("2620:4f:8000::/48", "AS112 direct delegation", Permit),
    ("3fff::/20", "documentation", Refuse),
    ("5f00::/16", "segment routing (SRv6) SIDs", Refuse),
    ("fc00::/7", "unique-local", Refuse),
    ("fe80::/10", "link-local", Refuse),
    ("fec0::/10", "site-local (deprecated)", Refuse),
    ("ff00::/8", "multicast", Refuse),
];

/// [`SPECIAL`], parsed once (a unit test checks every entry parses).
static TABLE: LazyLock<Vec<(IpNet, &'static str, Rule)>> = LazyLock::new(|| {
    SPECIAL
        .iter()
        .filter_map(|(block, name, rule)| Some((block.parse().ok()?, *name, *rule)))
        .collect()
});

/// The most specific special-purpose range holding `ip`.
fn special(ip: IpAddr) -> Option<(&'static str, Rule)> {
    TABLE
        .iter()
        .filter(|(net, _, _)| net.contains(&ip))
        .max_by_key(|(net, _, _)| net.prefix_len())
        .map(|(_, name, rule)| (*name, *rule))
}

/// The IPv4 address an IPv6 one carries to a router that unwraps it, if any.
pub fn carried_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    match special(IpAddr::V6(ip))? {
        (_, Carries(Low32)) => Some(Ipv4Addr::from(bits as u32)),
        (_, Carries(SixToFour)) => Some(Ipv4Addr::from((bits >> 80) as u32)),
        _ => None,
    }
}

/// An IPv4-mapped address as the IPv4 address it is on a dual-stack socket.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a connection to `addr` would reach the service listening on
/// `service`: the same port, and the same address in any form (mapped, or
/// carried in an IPv6 one), or any address when the service listens on all.
pub fn reaches(addr: SocketAddr, service: SocketAddr) -> bool {
    let carried = match addr.ip() {
        IpAddr::V6(v6) => carried_ipv4(v6).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    let service_ip = canonical(service.ip());
    addr.port() == service.port()
        && (service_ip.is_unspecified()
            || canonical(addr.ip()) == service_ip
            || carried == Some(service_ip))
}

impl EgressPolicy {
    /// Whether a job may reach `addr`.
    pub fn permits(&self, addr: SocketAddr) -> bool {
        self.check(addr).is_ok()
    }

    /// Whether a job may reach `addr`, and if not, why.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Denied> {
        let ip = addr.ip();
        let carried = match ip {
            IpAddr::V6(v6) => carried_ipv4(v6),
            IpAddr::V4(_) => None,
        };
        if self.deny.iter().any(|d| reaches(addr, *d)) {
            return Err(Denied::OwnService(addr));
        }
        let allowed = |a: IpAddr| self.allow.iter().any(|c| c.contains(a));
        if allowed(ip) || carried.is_some_and(|v4| allowed(v4.into())) {
            return Ok(());
        }
        match (ip, carried) {
            (IpAddr::V6(v6), Some(v4)) => match special(IpAddr::V4(v4)) {
                Some((name, Refuse)) => Err(Denied::Carries(v6, v4, name)),
                _ => Ok(()),
            },
            _ => match special(ip) {
                Some((name, Refuse)) => Err(Denied::Special(ip, name)),
                _ => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(p: &EgressPolicy, ip: &str) -> bool {
        let ip: IpAddr = ip.parse().unwrap_or_else(|_| panic!("{ip}"));
        p.permits(SocketAddr::new(ip, 443))
    }

    #[test]
    fn every_special_range_parses_and_is_in_the_table() {
        assert_eq!(
            TABLE.len(),
            SPECIAL.len(),
            "an entry of SPECIAL does not parse"
        );
        for (net, _, _) in TABLE.iter() {
            assert_eq!(*net, net.trunc(), "{net}: host bits set");
        }
    }

    /// Every entry of the IANA IPv4 Special-Purpose Address Registry, and
    /// multicast: a sample address inside it and the verdict.
    #[test]
    fn ipv4_special_purpose_registry() {
        let p = EgressPolicy::default();
        let table: &[(&str, &str, bool)] = &[
            ("0.0.0.0/8", "0.1.2.3", false),
            ("0.0.0.0/32", "0.0.0.0", false),
            ("10.0.0.0/8", "10.200.0.1", false),
            ("100.64.0.0/10", "100.127.255.254", false),
            ("127.0.0.0/8", "127.0.0.1", false),
            ("127.0.0.0/8", "127.255.255.254", false),
            ("169.254.0.0/16", "169.254.169.254", false),
            ("172.16.0.0/12", "172.31.255.1", false),
            ("192.0.0.0/24", "192.0.0.100", false),
            ("192.0.0.0/29", "192.0.0.1", false),
            ("192.0.0.8/32", "192.0.0.8", false),
            ("192.0.0.9/32", "192.0.0.9", true),
            ("192.0.0.10/32", "192.0.0.10", true),
            ("192.0.0.170/32", "192.0.0.170", false),
            ("192.0.0.171/32", "192.0.0.171", false),
            ("192.0.2.0/24", "192.0.2.1", false),
            ("192.31.196.0/24", "192.31.196.1", true),
            ("192.52.193.0/24", "192.52.193.1", true),
            ("192.88.99.0/24", "192.88.99.1", false),
            ("192.88.99.2/32", "192.88.99.2", false),
            ("192.168.0.0/16", "192.168.1.1", false),
            ("192.175.48.0/24", "192.175.48.1", true),
            ("198.18.0.0/15", "198.19.255.1", false),
            ("198.51.100.0/24", "198.51.100.7", false),
            ("203.0.113.0/24", "203.0.113.9", false),
            ("224.0.0.0/4", "239.255.255.250", false),
            ("240.0.0.0/4", "250.1.2.3", false),
            ("255.255.255.255/32", "255.255.255.255", false),
        ];
        for (block, sample, expect) in table {
            assert!(block
                .parse::<IpNet>()
                .unwrap()
                .contains(&sample.parse::<IpAddr>().unwrap()));
            assert_eq!(verdict(&p, sample), *expect, "{sample} in {block}");
        }
        // Just outside some edges: public.
        for public in [
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "93.184.216.34",
        ] {
            assert!(verdict(&p, public), "{public}");
        }
    }

    /// Every entry of the IANA IPv6 Special-Purpose Address Registry, the
    /// deprecated ranges and multicast: a sample and the verdict.
    #[test]
    fn ipv6_special_purpose_registry() {
        let p = EgressPolicy::default();
        let table: &[(&str, &str, bool)] = &[
            ("::/128", "::", false),
            ("::1/128", "::1", false),
            (
                "::ffff:0:0/96 (IPv4-mapped, public)",
                "::ffff:8.8.8.8",
                true,
            ),
            (
                "::ffff:0:0/96 (IPv4-mapped, loopback)",
                "::ffff:127.0.0.1",
                false,
            ),
            (
                "::ffff:0:0/96 (IPv4-mapped, metadata)",
                "::ffff:169.254.169.254",
                false,
            ),
            ("::/96 (IPv4-compatible, deprecated)", "::8.8.8.8", false),
            ("::/96 (IPv4-compatible, deprecated)", "::127.0.0.1", false),
            (
                "::ffff:0:0:0/96 (IPv4-translated)",
                "::ffff:0:8.8.8.8",
                false,
            ),
            (
                "::ffff:0:0:0/96 (IPv4-translated)",
                "::ffff:0:127.0.0.1",
                false,
            ),
            ("64:ff9b::/96 (NAT64, public)", "64:ff9b::8.8.8.8", true),
            ("64:ff9b::/96 (NAT64, loopback)", "64:ff9b::7f00:1", false),
            ("64:ff9b::/96 (NAT64, private)", "64:ff9b::10.0.0.1", false),
            (
                "64:ff9b:1::/48 (local-use NAT64)",
                "64:ff9b:1::8.8.8.8",
                false,
            ),
            (
                "64:ff9b:1::/48 (local-use NAT64)",
                "64:ff9b:1:ffff::1",
                false,
            ),
            ("100::/64", "100::1", false),
            ("100:0:0:1::/64", "100:0:0:1::1", false),
            ("2001::/23", "2001:100::1", false),
            (
                "2001::/32 (Teredo)",
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                false,
            ),
            (
                "2001::/32 (Teredo to 127.0.0.1)",
                "2001:0:7f00:1::80ff:fffe",
                false,
            ),
            ("2001:1::1/128", "2001:1::1", true),
            ("2001:1::2/128", "2001:1::2", true),
            ("2001:1::3/128", "2001:1::3", true),
            ("2001:1::/32 (other)", "2001:1::4", false),
            ("2001:2::/48", "2001:2::1", false),
            ("2001:3::/32", "2001:3::1", true),
            ("2001:4:112::/48", "2001:4:112::1", true),
            ("2001:10::/28", "2001:10::1", false),
            ("2001:20::/28", "2001:20::1", true),
            ("2001:30::/28", "2001:30::1", true),
            ("2001:db8::/32", "2001:db8::1", false),
            ("2002::/16 (6to4, public)", "2002:808:808::1", true),
            ("2002::/16 (6to4, loopback)", "2002:7f00:1::1", false),
            ("2002::/16 (6to4, private)", "2002:c0a8:101::1", false),
            ("2620:4f:8000::/48", "2620:4f:8000::1", true),
            ("3fff::/20", "3fff:fff::1", false),
            ("5f00::/16", "5f00::1", false),
            ("fc00::/7", "fd12:3456::1", false),
            ("fe80::/10", "fe80::1", false),
            ("fec0::/10 (site-local, deprecated)", "fec0::1", false),
            ("ff00::/8", "ff02::1", false),
        ];
        for (block, sample, expect) in table {
            assert_eq!(verdict(&p, sample), *expect, "{sample} in {block}");
        }
        for public in [
            "2606:4700::1111",
            "2a00:1450:4001::1",
            "2001:200::1",
            "3fff:1000::1",
            "2620:4f:8001::1",
        ] {
            assert!(verdict(&p, public), "{public}");
        }
    }

    #[test]
    fn carriers_name_the_address_they_carry() {
        let p = EgressPolicy::default();
        let a: SocketAddr = "[64:ff9b::7f00:1]:6379".parse().unwrap();
        assert_eq!(
            p.check(a),
            Err(Denied::Carries(
                "64:ff9b::7f00:1".parse().unwrap(),
                Ipv4Addr::LOCALHOST,
                "loopback"
            ))
        );
        assert_eq!(
            carried_ipv4("2002:c000:0204::1".parse().unwrap()),
            Some(Ipv4Addr::new(192, 0, 2, 4))
        );
        assert_eq!(carried_ipv4("2606:4700::1".parse().unwrap()), None);
    }

    #[test]
    fn allowed_ranges_and_the_workers_own_services() {
        let p = EgressPolicy {
            allow: vec![
                Cidr::parse("127.0.0.0/8").unwrap(),
                Cidr::parse("10.1.2.3").unwrap(),
            ],
            deny: vec![
                "127.0.0.1:6379".parse().unwrap(),
                "0.0.0.0:9100".parse().unwrap(),
            ],
            ..Default::default()
        };
        let ok = |a: &str| p.permits(a.parse().unwrap());
        assert!(ok("127.0.0.1:8080"));
        assert!(
            ok("[::ffff:127.0.0.1]:8080"),
            "mapped form of an allowed address"
        );
        assert!(
            ok("[64:ff9b::7f00:1]:8080"),
            "NAT64 form of an allowed address"
        );
        assert!(ok("10.1.2.3:80"));
        assert!(!ok("10.1.2.4:80"));
        for own in [
            "127.0.0.1:6379",
            "[::ffff:127.0.0.1]:6379",
            "[64:ff9b::7f00:1]:6379",
            "[2002:7f00:1::]:6379",
            "127.0.0.1:9100",
            "10.1.2.3:9100",
            "93.184.216.34:9100",
        ] {
            assert!(!ok(own), "{own}: the worker's own service, always");
        }
        assert!(ok("127.0.0.2:6379"), "another address, same port");
    }

    #[test]
    fn cidrs_keep_the_flag_syntax() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("10.0.0/8").is_none());
        assert!(Cidr::parse("example.com").is_none());
        assert!(Cidr::parse("10.1.2.3")
            .unwrap()
            .contains("10.1.2.3".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
    }
}
