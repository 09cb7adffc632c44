//! The syntax of each kind of value, and the limits that depend on that value alone.
//!
//! Each parser takes the scalar's text and returns the value, or why it is refused; the
//! schema turns that into `invalid KEY "TEXT" in SECTION: REASON`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    time::Duration,
};

use super::error::{quote, suggest};

/// Result of a value parser: the value, or the reason it is refused.
pub(crate) type Parsed<T> = Result<T, String>;

/// An unsigned integer, decimal or `0x` hex.
fn integer(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// An integer in `min..=max`.
pub(crate) fn uint<T>(text: &str, range: RangeInclusive<T>) -> Parsed<T>
where
    T: Copy + Into<u64> + TryFrom<u64>,
{
    let (min, max) = ((*range.start()).into(), (*range.end()).into());
    integer(text)
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("expected an integer from {min} to {max}"))
}

pub(crate) fn port(text: &str) -> Parsed<u16> {
    uint(text, 0..=u16::MAX)
}

/// A port to connect to: not 0.
pub(crate) fn check_port(text: &str) -> Parsed<u16> {
    uint(text, 1..=u16::MAX)
}

/// A 32-bit seed, decimal or hex.
pub(crate) fn hash_seed(text: &str) -> Parsed<u32> {
    integer(text)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| "expected an integer from 0 to 0xffffffff".to_owned())
}

/// A duration with a unit (`1s`, `200ms`, `1m 30s`), at least `min`.
pub(crate) fn duration(text: &str, min: Duration) -> Parsed<Duration> {
    let value = humantime::parse_duration(text.trim())
        .map_err(|_| "expected a duration with a unit, such as 1s or 200ms".to_owned())?;
    if value < min {
        return Err(format!(
            "must be at least {}",
            humantime::format_duration(min)
        ));
    }
    Ok(value)
}

/// A group of this host, by name: `(name, gid)`.
pub(crate) fn group(text: &str) -> Parsed<(String, u32)> {
    let name = text.trim();
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok((name.to_owned(), g.gid.as_raw())),
        Ok(None) => Err("no such group on this host".to_owned()),
        Err(e) => Err(format!("looking the group up: {e}")),
    }
}

/// `global.second_chance`: a duration up to a day, or 0 (off).
pub(crate) fn second_chance(text: &str) -> Parsed<Duration> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let value = duration(text, Duration::ZERO)?;
    if value > super::MAX_SECOND_CHANCE {
        return Err(format!(
            "must be at most {} (0 turns it off)",
            humantime::format_duration(super::MAX_SECOND_CHANCE)
        ));
    }
    Ok(value)
}

/// A percentage from 0% to `max_percent`%, as a fraction.
pub(crate) fn percent(text: &str, max_percent: u32) -> Parsed<f64> {
    let refuse = || format!("expected a percentage from 0% to {max_percent}%, such as 10%");
    let number = text.trim().strip_suffix('%').ok_or_else(refuse)?.trim_end();
    // Plain decimal digits only: no sign, exponent, `inf` or `nan`.
    if number.is_empty()
        || number.starts_with('.')
        || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(refuse());
    }
    let value: f64 = number.parse().map_err(|_| refuse())?;
    if value > f64::from(max_percent) {
        return Err(refuse());
    }
    Ok(value / 100.0)
}

/// A unicast IPv4 or IPv6 address.
pub(crate) fn unicast_address(text: &str) -> Parsed<IpAddr> {
    let address: IpAddr = text
        .trim()
        .parse()
        .map_err(|_| "expected an IPv4 or IPv6 address".to_owned())?;
    let unicast = match address {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    };
    if unicast {
        Ok(address)
    } else {
        Err("not a unicast address".to_owned())
    }
}

pub(crate) fn socket_address(text: &str) -> Parsed<SocketAddr> {
    text.trim().parse().map_err(|_| {
        "expected an address and port, such as 127.0.0.1:61100 or [::1]:61100".to_owned()
    })
}

/// `address/length`: an IPv4 (`v4`) or IPv6 prefix, `length` in `lengths` (at least 8),
/// no host bits set.
fn prefix(text: &str, v4: bool, lengths: RangeInclusive<u8>) -> Parsed<(IpAddr, u8)> {
    let expected = || {
        if v4 {
            "expected an IPv4 prefix such as 172.16.0.0/16".to_owned()
        } else {
            "expected an IPv6 prefix such as fd00:ffff::/96".to_owned()
        }
    };
    let (address, length) = text.trim().split_once('/').ok_or_else(expected)?;
    let address = address
        .parse::<IpAddr>()
        .ok()
        .filter(|a| a.is_ipv4() == v4)
        .ok_or_else(expected)?;
    let length: u8 = length
        .parse()
        .ok()
        .filter(|l| lengths.contains(l))
        .ok_or_else(|| {
            format!(
                "the prefix length must be from {} to {}",
                lengths.start(),
                lengths.end()
            )
        })?;
    let (bits, value) = match address {
        IpAddr::V4(a) => (32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (128, u128::from(a)),
    };
    // `length >= 8`, so the shift stays below 128.
    let host_mask = (1u128 << (bits - u32::from(length))) - 1;
    if value & host_mask != 0 {
        let network = value & !host_mask;
        let network = match address {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(network as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(network)),
        };
        return Err(format!(
            "host bits are set; did you mean {network}/{length}?"
        ));
    }
    Ok((address, length))
}

/// The IPIP outer source prefix: /8 to /32 (`prefix` has checked the family).
pub(crate) fn prefix_v4(text: &str) -> Parsed<(Ipv4Addr, u8)> {
    match prefix(text, true, 8..=32)? {
        (IpAddr::V4(a), length) => Ok((a, length)),
        (IpAddr::V6(_), _) => Err("expected an IPv4 prefix".to_owned()),
    }
}

/// The IPv6-in-IPv6 outer source prefix: /8 to /96 (the last 32 bits carry the flow hash).
pub(crate) fn prefix_v6(text: &str) -> Parsed<(Ipv6Addr, u8)> {
    match prefix(text, false, 8..=96)? {
        (IpAddr::V6(a), length) => Ok((a, length)),
        (IpAddr::V4(_), _) => Err("expected an IPv6 prefix".to_owned()),
    }
}

/// One of `words`; suggests the closest on a typo.
pub(crate) fn keyword<T: Copy>(text: &str, words: &[(&str, T)]) -> Parsed<T> {
    let text = text.trim();
    if let Some(&(_, value)) = words.iter().find(|(word, _)| *word == text) {
        return Ok(value);
    }
    let names: Vec<&str> = words.iter().map(|(word, _)| *word).collect();
    let list = match names.as_slice() {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    };
    match suggest(text, names.iter().copied()) {
        Some(close) => Err(format!("expected {list}; did you mean {}?", quote(close))),
        None => Err(format!("expected {list}")),
    }
}

/// A MaglevTable size: `auto` (`None`) or a number of slots, checked against the pool later.
pub(crate) fn table_size(text: &str) -> Parsed<Option<u32>> {
    if text.trim() == "auto" {
        return Ok(None);
    }
    integer(text)
        .and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| "expected auto or a prime number of slots, such as 65537".to_owned())
}

/// A Linux interface name, as the kernel's `dev_valid_name` accepts it.
pub(crate) fn interface_name(text: &str) -> Parsed<String> {
    const IFNAMSIZ: usize = 16;
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.len() >= IFNAMSIZ {
        return Err(format!("longer than {} bytes", IFNAMSIZ - 1));
    }
    if text == "." || text == ".." {
        return Err("not a valid interface name".to_owned());
    }
    if text
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("must not contain '/', ':' or whitespace".to_owned());
    }
    Ok(text.to_owned())
}

/// A name of a Vip, pool or Backend: anything printable.
pub(crate) fn name(text: &str) -> Parsed<String> {
    if text.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(text.to_owned())
}

/// A kernel routing table id for announced Vip routes: not one the kernel uses itself.
pub(crate) fn route_table(text: &str) -> Parsed<u32> {
    let table = uint(text, 1..=u32::MAX)?;
    match table {
        253 => Err("table 253 is the kernel's default table: choose another (e.g. 200)".into()),
        254 => Err("table 254 is the kernel's main table: choose another (e.g. 200)".into()),
        255 => Err("table 255 is the kernel's local table: choose another (e.g. 200)".into()),
        _ => Ok(table),
    }
}

pub(crate) fn absolute_path(text: &str) -> Parsed<PathBuf> {
    let path = PathBuf::from(text);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err("must be an absolute path".to_owned())
    }
}

/// HTTP status codes: `200` or `200-399`, within 100..=599.
pub(crate) fn status_range(text: &str) -> Parsed<RangeInclusive<u16>> {
    let refuse =
        || "expected a status such as 200 or a range such as 200-399, within 100-599".to_owned();
    let code = |s: &str| {
        let s = s.trim();
        (s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u16>().ok())
            .flatten()
            .filter(|c| (100..=599).contains(c))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (
            code(low).ok_or_else(refuse)?,
            code(high).ok_or_else(refuse)?,
        ),
        None => {
            let c = code(text).ok_or_else(refuse)?;
            (c, c)
        }
    };
    if low > high {
        return Err(format!("the range is empty: {low} is above {high}"));
    }
    Ok(low..=high)
}

/// The path of an HTTP request: starts with `/`, nothing that would break the request line.
pub(crate) fn http_path(text: &str) -> Parsed<String> {
    if !text.starts_with('/') {
        return Err("must start with /".to_owned());
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace".to_owned());
    }
    Ok(text.to_owned())
}

/// An HTTP `Host` header value.
pub(crate) fn http_host(text: &str) -> Parsed<String> {
    if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("expected a host name, without whitespace".to_owned());
    }
    Ok(text.to_owned())
}

/// A UDP payload: the string's UTF-8 bytes (YAML escapes such as `\x00` work in double
/// quotes).
pub(crate) fn payload(text: &str) -> Parsed<Vec<u8>> {
    Ok(text.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_decimal_or_hex() {
        assert_eq!(hash_seed("0x5eed1234"), Ok(0x5eed_1234));
        assert_eq!(hash_seed("24301"), Ok(24301));
        assert!(hash_seed("0x1_0000_0000").is_err());
        assert!(hash_seed("4294967296").is_err());
        assert!(hash_seed("-1").is_err());
        assert_eq!(port("65535"), Ok(65535));
        assert_eq!(
            port("65536"),
            Err("expected an integer from 0 to 65535".to_owned())
        );
        assert!(check_port("0").is_err());
    }

    #[test]
    fn durations_need_a_unit_and_a_minimum() {
        assert_eq!(
            duration("200ms", Duration::from_millis(10)),
            Ok(Duration::from_millis(200))
        );
        assert!(duration("5", Duration::ZERO).is_err());
        assert_eq!(
            duration("5ms", Duration::from_millis(10)),
            Err("must be at least 10ms".to_owned())
        );
    }

    #[test]
    fn percentages_are_fractions_within_the_limit() {
        assert_eq!(percent("10%", 50), Ok(0.1));
        assert_eq!(percent("0%", 50), Ok(0.0));
        assert_eq!(percent("2.5 %", 50), Ok(0.025));
        for bad in ["51%", "10", "-1%", "nan%", "inf%", "%", "1e1%"] {
            assert!(percent(bad, 50).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_check_length_and_host_bits() {
        assert_eq!(
            prefix_v4("172.16.0.0/16"),
            Ok((Ipv4Addr::new(172, 16, 0, 0), 16))
        );
        assert_eq!(
            prefix_v4("172.16.0.1/16"),
            Err("host bits are set; did you mean 172.16.0.0/16?".to_owned())
        );
        assert!(prefix_v4("10.0.0.0/7").is_err());
        assert!(prefix_v4("10.0.0.1/32").is_ok());
        assert!(prefix_v6("fd00:ffff::/96").is_ok());
        assert!(prefix_v6("fd00::/97").is_err());
        assert!(prefix_v6("fd00::1/96").is_err());
    }

    #[test]
    fn keywords_suggest_on_typos() {
        let words = [("tcp", 6), ("udp", 17)];
        assert_eq!(keyword("udp", &words), Ok(17));
        assert_eq!(
            keyword("tpc", &words),
            Err("expected tcp or udp; did you mean \"tcp\"?".to_owned())
        );
        assert_eq!(
            keyword("gre", &words),
            Err("expected tcp or udp".to_owned())
        );
    }

    #[test]
    fn status_ranges() {
        assert_eq!(status_range("200"), Ok(200..=200));
        assert_eq!(status_range("200-399"), Ok(200..=399));
        assert!(status_range("399-200").is_err());
        assert!(status_range("2000").is_err());
        assert!(status_range("99").is_err());
    }

    #[test]
    fn interface_names_follow_the_kernel() {
        assert!(interface_name("eth0").is_ok());
        assert!(interface_name("enp0s31f6.100").is_ok());
        for bad in ["", ".", "a/b", "a b", "eth0:1", "abcdefghijklmnop"] {
            assert!(interface_name(bad).is_err(), "{bad:?}");
        }
    }
}
