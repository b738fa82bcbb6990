//! The swarm listener's SDP: a hand-written offer and a small answer parser.
//!
//! Hand-written because the swarm has no peer connection to generate it: the offer is exactly
//! what a browser's receive-only audio offer carries and nothing else (one `m=audio` section,
//! Opus, rtcp-mux, BUNDLE, ICE credentials, one host candidate, the DTLS fingerprint and
//! `a=setup:actpass`). The answer parser reads only what the listener needs to connect (the
//! server's ICE credentials, fingerprint, DTLS setup role and host candidate) and the direction,
//! and rejects an answer missing any of them with a message saying which.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};

/// The direction a listener offers (`a=sendrecv` or `a=recvonly`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `a=sendrecv`: what servers that accept only full participants require. The listener still
    /// never sends RTP (a muted browser tab).
    SendRecv,
    /// `a=recvonly`: a pure listener.
    RecvOnly,
}

impl Direction {
    /// The SDP attribute value.
    pub fn as_sdp(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::RecvOnly => "recvonly",
        }
    }
}

/// What goes into one listener's offer.
#[derive(Debug)]
pub(crate) struct OfferParams<'a> {
    pub(crate) session_id: u64,
    pub(crate) local: SocketAddr,
    pub(crate) ice_ufrag: &'a str,
    pub(crate) ice_pwd: &'a str,
    /// `AB:CD:...` SHA-256 of the DTLS certificate.
    pub(crate) fingerprint: &'a str,
    pub(crate) direction: Direction,
    /// The SSRC the listener would send with: declared (`a=ssrc`, `a=msid`) in a sendrecv
    /// offer, as a browser does, so a server can tie the stream to the section without
    /// probing header extensions.
    pub(crate) ssrc: u32,
}

/// The offer SDP (CRLF line endings, as the grammar wants).
pub(crate) fn offer(params: &OfferParams<'_>) -> String {
    let ip = params.local.ip();
    let port = params.local.port();
    let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
    // A host candidate's priority (RFC 8445 §5.1.2.1): type preference 126, local preference
    // 65535, component 1.
    let priority: u32 = (126 << 24) | (65535 << 8) | 255;
    let mut lines = vec![
        "v=0".to_owned(),
        format!("o=- {} 2 IN {family} {ip}", params.session_id),
        "s=-".to_owned(),
        "t=0 0".to_owned(),
        "a=group:BUNDLE 0".to_owned(),
        "a=msid-semantic: WMS".to_owned(),
        format!("m=audio {port} UDP/TLS/RTP/SAVPF 111"),
        format!("c=IN {family} {ip}"),
        format!("a=candidate:1 1 udp {priority} {ip} {port} typ host"),
        "a=end-of-candidates".to_owned(),
        format!("a=ice-ufrag:{}", params.ice_ufrag),
        format!("a=ice-pwd:{}", params.ice_pwd),
        format!("a=fingerprint:sha-256 {}", params.fingerprint),
        "a=setup:actpass".to_owned(),
        "a=mid:0".to_owned(),
        format!("a=extmap:1 {AUDIO_LEVEL_URI}"),
        format!("a={}", params.direction.as_sdp()),
        "a=rtcp-mux".to_owned(),
        "a=rtpmap:111 opus/48000/2".to_owned(),
        "a=fmtp:111 minptime=10;useinbandfec=1;usedtx=1".to_owned(),
    ];
    if params.direction == Direction::SendRecv {
        let cname = format!("swarm-{:08x}", params.ssrc);
        lines.push(format!("a=msid:{cname} audio"));
        lines.push(format!("a=ssrc:{} cname:{cname}", params.ssrc));
        lines.push(format!("a=ssrc:{} msid:{cname} audio", params.ssrc));
    }
    lines.join("\r\n") + "\r\n"
}

/// The DTLS role the answer leaves to the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtlsRole {
    /// The server answered `a=setup:passive`: the listener sends the ClientHello.
    Client,
    /// The server answered `a=setup:active`: the listener waits for the server's ClientHello.
    Server,
}

/// What the listener needs from the answer.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) ice_ufrag: String,
    pub(crate) ice_pwd: String,
    /// Lower-case `ab:cd:...` SHA-256 fingerprint of the server's certificate.
    pub(crate) fingerprint: String,
    pub(crate) role: DtlsRole,
    /// The server's component-1 UDP candidate the listener can reach from its own address
    /// (see [`parse_answer`]).
    pub(crate) candidate: SocketAddr,
    /// The answer's direction attribute (`sendonly`, `sendrecv`, ...).
    pub(crate) direction: String,
    /// The id the answer gives the RFC 6464 audio-level extension (`a=extmap`), if any.
    pub(crate) audio_level_id: Option<u8>,
}

/// The RFC 6464 client-to-mixer audio-level header extension.
pub(crate) const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Parses the server's answer. Session-level attributes count as defaults for the one media
/// section, as RFC 8866 says. Of several candidates (a full ICE agent such as Janus lists one
/// per interface and family), the first on `local_ip` itself wins, then the first on its
/// IPv4 /24 (the server's side of the bench's swarm network), then the first of its family:
/// the listener has one socket and checks one pair.
pub(crate) fn parse_answer(sdp: &str, local_ip: IpAddr) -> Result<Answer> {
    let mut ice_ufrag = None;
    let mut ice_pwd = None;
    let mut fingerprint = None;
    let mut setup = None;
    let mut candidates = Vec::new();
    let mut direction = None;
    let mut audio_level_id = None;
    let mut audio_sections = 0;
    for line in sdp.lines().map(str::trim_end) {
        if line.starts_with("m=") {
            if line.starts_with("m=audio ") {
                audio_sections += 1;
            }
            continue;
        }
        let Some(attribute) = line.strip_prefix("a=") else {
            continue;
        };
        let (name, value) = attribute.split_once(':').unwrap_or((attribute, ""));
        match name {
            "ice-ufrag" => ice_ufrag = Some(value.to_owned()),
            "ice-pwd" => ice_pwd = Some(value.to_owned()),
            "fingerprint" => {
                let (algorithm, hex) = value
                    .split_once(' ')
                    .with_context(|| format!("malformed a=fingerprint `{value}`"))?;
                if algorithm.eq_ignore_ascii_case("sha-256") {
                    fingerprint = Some(hex.trim().to_ascii_lowercase());
                }
            }
            "setup" => setup = Some(value.to_owned()),
            "candidate" => candidates.extend(parse_candidate(value)),
            "extmap" => {
                // `a=extmap:<id>[/<direction>] <uri> [<attributes>]`
                let mut fields = value.split_whitespace();
                let id = fields
                    .next()
                    .and_then(|id| id.split('/').next()?.parse().ok());
                if fields.next() == Some(AUDIO_LEVEL_URI) {
                    audio_level_id = id;
                }
            }
            "sendrecv" | "sendonly" | "recvonly" | "inactive" => direction = Some(name.to_owned()),
            _ => {}
        }
    }
    let candidate = candidates
        .iter()
        .find(|c| c.ip() == local_ip)
        .or_else(|| candidates.iter().find(|c| same_slash_24(c.ip(), local_ip)))
        .or_else(|| {
            candidates
                .iter()
                .find(|c| c.is_ipv4() == local_ip.is_ipv4())
        })
        .copied();
    if audio_sections != 1 {
        bail!("the answer has {audio_sections} audio sections, expected 1:\n{sdp}");
    }
    let role = match setup.as_deref() {
        Some("active") => DtlsRole::Server,
        Some("passive") => DtlsRole::Client,
        other => bail!("the answer's a=setup is {other:?}; expected active or passive"),
    };
    Ok(Answer {
        ice_ufrag: ice_ufrag.context("the answer has no a=ice-ufrag")?,
        ice_pwd: ice_pwd.context("the answer has no a=ice-pwd")?,
        fingerprint: fingerprint.context("the answer has no sha-256 a=fingerprint")?,
        role,
        candidate: candidate.with_context(|| {
            format!("the answer has no component-1 UDP candidate of {local_ip}'s family")
        })?,
        // RFC 8866 §6.7: no direction attribute means sendrecv.
        direction: direction.unwrap_or_else(|| "sendrecv".to_owned()),
        audio_level_id,
    })
}

/// Whether `a` and `b` are IPv4 addresses of one /24.
fn same_slash_24(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.octets()[..3] == b.octets()[..3],
        _ => false,
    }
}

/// `foundation component transport priority address port typ type ...`: the address of a
/// component-1 UDP candidate with a literal IP (an mDNS name is of no use to the swarm).
fn parse_candidate(value: &str) -> Option<SocketAddr> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    let [
        _foundation,
        component,
        transport,
        _priority,
        address,
        port,
        ..,
    ] = fields.as_slice()
    else {
        return None;
    };
    if *component != "1" || !transport.eq_ignore_ascii_case("udp") {
        return None;
    }
    let ip: IpAddr = address.parse().ok()?;
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_chorus_like_answer() {
        let answer = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=ice-lite\r\n\
            a=fingerprint:sha-256 AB:CD\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
            a=ice-ufrag:u\r\na=ice-pwd:p\r\na=setup:active\r\na=sendonly\r\n\
            a=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
            a=extmap:7/recvonly urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
            a=candidate:1 1 udp 2130706431 ::1 4001 typ host\r\n\
            a=candidate:1 1 udp 2130706431 127.0.0.1 4000 typ host\r\n";
        let local = IpAddr::from([127, 0, 0, 1]);
        let parsed = parse_answer(answer, local).expect("parses");
        assert_eq!(parsed.audio_level_id, Some(7));
        assert_eq!(parsed.fingerprint, "ab:cd");
        assert_eq!(parsed.role, DtlsRole::Server);
        assert_eq!(
            parsed.candidate,
            "127.0.0.1:4000".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(parsed.direction, "sendonly");
        // Another IPv4 address is second best; IPv6 only is unusable from an IPv4 socket.
        let elsewhere = parse_answer(answer, IpAddr::from([10, 0, 0, 1])).expect("parses");
        assert_eq!(elsewhere.candidate, parsed.candidate);
        // A candidate on the listener's own /24 beats the first of the family.
        let two_nets = answer.replace(
            "a=candidate:1 1 udp 2130706431 127.0.0.1 4000 typ host\r\n",
            "a=candidate:1 1 udp 2130706431 192.0.2.2 4000 typ host\r\n\
             a=candidate:2 1 udp 2130706431 10.77.0.1 4002 typ host\r\n",
        );
        let on_own_net = parse_answer(&two_nets, IpAddr::from([10, 77, 0, 2])).expect("parses");
        assert_eq!(
            on_own_net.candidate,
            "10.77.0.1:4002".parse::<SocketAddr>().expect("addr")
        );
        let v6_only = answer.replace(
            "a=candidate:1 1 udp 2130706431 127.0.0.1 4000 typ host\r\n",
            "",
        );
        assert!(parse_answer(&v6_only, local).is_err());
        let no_level = answer.replace("ssrc-audio-level", "csrc-audio-level");
        assert_eq!(
            parse_answer(&no_level, local)
                .expect("parses")
                .audio_level_id,
            None
        );
        let actpass = answer.replace("a=setup:active", "a=setup:actpass");
        assert!(parse_answer(&actpass, local).is_err());
        assert!(parse_answer(&answer.replace("a=ice-pwd:p\r\n", ""), local).is_err());
    }
}
