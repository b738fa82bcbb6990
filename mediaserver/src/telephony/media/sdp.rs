//! The phone leg's SDP (RFC 4566, offer/answer per RFC 3264). We always dial out, so we always
//! write the offer and read the answer; nothing here parses an offer.
//!
//! The offer is one audio stream: our codecs in order of preference, RFC 4733 telephone events,
//! a 20 ms ptime, and, when SRTP is wanted, `RTP/SAVP` with one SDES `a=crypto` (RFC 4568).
//!
//! Reading the answer follows RFC 3264 §6–7:
//! - the first `m=audio` line is ours (we offer one stream); port 0 means the phone rejected it;
//! - the codec is the first payload type of that m-line that names a codec we offered, matched
//!   by `a=rtpmap` (so a phone may answer Opus under another dynamic number), or by the static
//!   number for G.711 without an rtpmap;
//! - the phone's payload type numbers are the ones it wants to receive: we send with them, and
//!   accept ours or theirs inbound ([`PhoneAnswer::is_audio`]);
//! - a media-level `c=` or direction attribute overrides the session-level one;
//! - with `RTP/SAVP` the answer must carry an `a=crypto` with the tag and suite we offered.
//!
//! Invariants: any text gets a [`PhoneAnswer`] or a [`PhoneMediaError`], never a panic; errors
//! quote at most a short, printable excerpt of what the phone sent, and never key material.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::srtp::{CRYPTO_SUITE, SdesKey};
use super::{
    PTIME_MS, PhoneCodec, PhoneMediaError, TELEPHONE_EVENT_CLOCK_RATE, TELEPHONE_EVENT_PAYLOAD_TYPE,
};

/// The `a=crypto` tag of our one offered key.
pub const CRYPTO_TAG: u32 = 1;
/// The transport profile of plain RTP.
pub const PROFILE_RTP: &str = "RTP/AVP";
/// The transport profile of SRTP.
pub const PROFILE_SRTP: &str = "RTP/SAVP";

/// How long an excerpt of the phone's text an error message may quote.
const EXCERPT_CHARS: usize = 60;

/// What we put in an offer, and what the answer is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferParams {
    /// The address the phone should send RTP to (`o=` and `c=`).
    pub address: IpAddr,
    /// Our RTP port.
    pub port: u16,
    /// The codecs offered, in order of preference. Duplicates are written once; an empty list
    /// makes an offer no phone can accept.
    pub codecs: Vec<PhoneCodec>,
    /// `o=` session id (RFC 4566 §5.2: an NTP-ish number, unique per call).
    pub session_id: u64,
    /// `o=` session version, incremented by the caller on each new offer in the dialog.
    pub session_version: u64,
    /// Our SDES key when SRTP is required (the profile becomes `RTP/SAVP`); `None` for RTP.
    pub srtp: Option<SdesKey>,
}

impl OfferParams {
    /// The transport profile of the m-line.
    pub fn profile(&self) -> &'static str {
        if self.srtp.is_some() {
            PROFILE_SRTP
        } else {
            PROFILE_RTP
        }
    }

    fn offered_codecs(&self) -> Vec<PhoneCodec> {
        let mut codecs: Vec<PhoneCodec> = Vec::with_capacity(self.codecs.len());
        for &codec in &self.codecs {
            if !codecs.contains(&codec) {
                codecs.push(codec);
            }
        }
        codecs
    }
}

/// The media direction, as the phone states it (its own point of view).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Both ways (the default when no attribute is present).
    SendRecv,
    /// The phone only sends (e.g. it holds us with music).
    SendOnly,
    /// The phone only receives.
    RecvOnly,
    /// Neither (on hold).
    Inactive,
}

impl Direction {
    /// Whether the phone will send us audio.
    pub fn phone_sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// Whether the phone wants audio from us.
    pub fn phone_receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }

    fn from_attribute(name: &str) -> Option<Self> {
        match name {
            "sendrecv" => Some(Direction::SendRecv),
            "sendonly" => Some(Direction::SendOnly),
            "recvonly" => Some(Direction::RecvOnly),
            "inactive" => Some(Direction::Inactive),
            _ => None,
        }
    }
}

/// The telephone-event format the phone answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TelephoneEventFormat {
    /// Its payload type in the answer (we send with it).
    pub payload_type: u8,
    /// Its clock rate (durations of events are in these units).
    pub clock_rate: u32,
}

/// What the phone's answer settles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhoneAnswer {
    /// The codec both ends use.
    pub codec: PhoneCodec,
    /// The codec's payload type in the answer: what we send with.
    pub payload_type: u8,
    /// The codec's `a=fmtp` parameters in the answer, if any (e.g. `stereo=1;sprop-stereo=1`).
    pub codec_fmtp: Option<String>,
    /// RFC 4733 telephone events, if the phone accepted them.
    pub telephone_event: Option<TelephoneEventFormat>,
    /// Where to send RTP (`c=` address, `m=` port). `0.0.0.0` is RFC 2543-style hold.
    pub remote: SocketAddr,
    /// The phone's stated direction.
    pub direction: Direction,
    /// The phone's `a=ptime`, if it gave one.
    pub ptime_ms: Option<u32>,
    /// The phone's SDES key (for its packets to us), present exactly when we offered SRTP.
    pub remote_key: Option<SdesKey>,
}

impl PhoneAnswer {
    /// Whether an inbound payload type is the negotiated audio codec: the phone's number, or
    /// ours (phones commonly send with the offerer's mapping).
    pub fn is_audio(&self, payload_type: u8) -> bool {
        payload_type == self.payload_type || payload_type == self.codec.payload_type()
    }

    /// Whether an inbound payload type is a telephone event (the phone's number or ours).
    pub fn is_telephone_event(&self, payload_type: u8) -> bool {
        self.telephone_event.is_some_and(|format| {
            payload_type == format.payload_type || payload_type == TELEPHONE_EVENT_PAYLOAD_TYPE
        })
    }
}

/// Writes our offer. Lines end with CRLF.
pub fn build_offer(params: &OfferParams) -> String {
    let family = match params.address {
        IpAddr::V4(_) => "IP4",
        IpAddr::V6(_) => "IP6",
    };
    let codecs = params.offered_codecs();
    let mut payload_types = String::new();
    for codec in &codecs {
        // Writing to a String cannot fail.
        let _ = write!(payload_types, "{} ", codec.payload_type());
    }
    let mut sdp = String::with_capacity(512);
    let mut line = |text: std::fmt::Arguments<'_>| {
        let _ = sdp.write_fmt(text);
        sdp.push_str("\r\n");
    };
    line(format_args!("v=0"));
    line(format_args!(
        "o=chorus {} {} IN {family} {}",
        params.session_id, params.session_version, params.address
    ));
    line(format_args!("s=chorus"));
    line(format_args!("c=IN {family} {}", params.address));
    line(format_args!("t=0 0"));
    line(format_args!(
        "m=audio {} {} {payload_types}{TELEPHONE_EVENT_PAYLOAD_TYPE}",
        params.port,
        params.profile()
    ));
    for codec in &codecs {
        let pt = codec.payload_type();
        match codec {
            PhoneCodec::Opus => {
                line(format_args!("a=rtpmap:{pt} opus/48000/2"));
                // In-band FEC rides out the loss of a single packet; 10 ms minimum lets a phone
                // that wants lower delay use it.
                line(format_args!("a=fmtp:{pt} useinbandfec=1;minptime=10"));
            }
            PhoneCodec::Pcmu | PhoneCodec::Pcma => {
                line(format_args!(
                    "a=rtpmap:{pt} {}/{}",
                    codec.name(),
                    codec.clock_rate()
                ));
            }
        }
    }
    line(format_args!(
        "a=rtpmap:{TELEPHONE_EVENT_PAYLOAD_TYPE} telephone-event/{TELEPHONE_EVENT_CLOCK_RATE}"
    ));
    line(format_args!("a=fmtp:{TELEPHONE_EVENT_PAYLOAD_TYPE} 0-15"));
    line(format_args!("a=ptime:{PTIME_MS}"));
    line(format_args!("a=sendrecv"));
    if let Some(key) = &params.srtp {
        line(format_args!("a={}", key.to_attribute(CRYPTO_TAG)));
    }
    sdp
}

/// One `x=value` line, with its 1-based number.
#[derive(Clone, Copy, Debug)]
struct Line<'a> {
    number: usize,
    kind: u8,
    value: &'a str,
}

impl Line<'_> {
    fn error(&self, reason: &str) -> PhoneMediaError {
        PhoneMediaError::MalformedSdp {
            line: self.number,
            reason: format!("{reason}: {}", excerpt(self.value)),
        }
    }

    /// The value of an attribute line `a=<name>` or `a=<name>:<value>`.
    fn attribute(&self) -> Option<(&str, Option<&str>)> {
        if self.kind != b'a' {
            return None;
        }
        Some(match self.value.split_once(':') {
            Some((name, value)) => (name, Some(value)),
            None => (self.value, None),
        })
    }
}

/// An `a=rtpmap` entry.
#[derive(Clone, Copy, Debug)]
struct RtpMap<'a> {
    payload_type: u8,
    encoding: &'a str,
    clock_rate: u32,
    channels: Option<&'a str>,
}

/// Reads the phone's answer to `offer`.
pub fn parse_answer(text: &str, offer: &OfferParams) -> Result<PhoneAnswer, PhoneMediaError> {
    let lines = split_lines(text)?;
    let audio_start = lines
        .iter()
        .position(|line| line.kind == b'm' && line.value.starts_with("audio "))
        .ok_or(PhoneMediaError::NoAudio)?;
    let session_end = lines
        .iter()
        .position(|line| line.kind == b'm')
        .unwrap_or(lines.len());
    let session = &lines[..session_end];
    let audio_end = lines[audio_start + 1..]
        .iter()
        .position(|line| line.kind == b'm')
        .map_or(lines.len(), |offset| audio_start + 1 + offset);
    let m_line = &lines[audio_start];
    let media = &lines[audio_start + 1..audio_end];

    // m=audio <port>[/<count>] <proto> <fmt> ...
    let mut fields = m_line.value.split_ascii_whitespace().skip(1);
    let port_field = fields
        .next()
        .ok_or_else(|| m_line.error("m= line without a port"))?;
    let port = port_field
        .split('/')
        .next()
        .and_then(|port| port.parse::<u16>().ok())
        .ok_or_else(|| m_line.error("m= port is not a number"))?;
    let proto = fields
        .next()
        .ok_or_else(|| m_line.error("m= line without a protocol"))?;
    let formats: Vec<&str> = fields.collect();
    if port == 0 {
        return Err(PhoneMediaError::AudioRejected);
    }
    if proto != offer.profile() {
        return Err(PhoneMediaError::ProfileMismatch {
            offered: offer.profile(),
            answered: excerpt(proto),
        });
    }
    let payload_types = formats
        .iter()
        .map(|format| {
            format
                .parse::<u8>()
                .ok()
                .filter(|&pt| pt <= 127)
                .ok_or_else(|| m_line.error("m= payload type is not 0..=127"))
        })
        .collect::<Result<Vec<u8>, _>>()?;

    let mut rtpmaps = Vec::new();
    let mut fmtps = Vec::new();
    let mut ptime_ms = None;
    let mut crypto_lines = Vec::new();
    for line in media {
        match line.attribute() {
            Some(("rtpmap", Some(value))) => rtpmaps.push(parse_rtpmap(line, value)?),
            Some(("fmtp", Some(value))) => {
                let (pt, parameters) = value
                    .split_once(' ')
                    .ok_or_else(|| line.error("a=fmtp without parameters"))?;
                fmtps.push((pt.trim(), parameters.trim()));
            }
            Some(("ptime", Some(value))) => {
                // Some phones write a fraction ("20.0"); only whole milliseconds make sense.
                let whole = value.trim().split('.').next().unwrap_or_default();
                ptime_ms = Some(
                    whole
                        .parse::<u32>()
                        .map_err(|_| line.error("a=ptime is not a number"))?,
                );
            }
            Some(("crypto", Some(_))) => crypto_lines.push(*line),
            _ => {}
        }
    }

    let codecs = offer.offered_codecs();
    let rtpmap_of = |pt: u8| rtpmaps.iter().find(|map| map.payload_type == pt);
    let chosen = payload_types.iter().find_map(|&pt| {
        let codec = match rtpmap_of(pt) {
            Some(map) => codec_of_rtpmap(map)?,
            // No rtpmap: a static number, or (leniently) our own dynamic number kept as offered.
            None => codecs
                .iter()
                .copied()
                .find(|codec| codec.payload_type() == pt)?,
        };
        codecs.contains(&codec).then_some((codec, pt))
    });
    let Some((codec, payload_type)) = chosen else {
        return Err(PhoneMediaError::CodecMismatch {
            answered: excerpt(&formats.join(" ")),
        });
    };
    let codec_fmtp = fmtps
        .iter()
        .find(|(pt, _)| pt.parse::<u8>().ok() == Some(payload_type))
        .map(|(_, parameters)| (*parameters).to_owned());
    let telephone_event = payload_types.iter().find_map(|&pt| match rtpmap_of(pt) {
        Some(map) if map.encoding.eq_ignore_ascii_case("telephone-event") => {
            Some(TelephoneEventFormat {
                payload_type: pt,
                clock_rate: map.clock_rate,
            })
        }
        None if pt == TELEPHONE_EVENT_PAYLOAD_TYPE => Some(TelephoneEventFormat {
            payload_type: pt,
            clock_rate: TELEPHONE_EVENT_CLOCK_RATE,
        }),
        _ => None,
    });

    let connection =
        match media.iter().find(|line| line.kind == b'c') {
            Some(line) => line,
            None => session.iter().find(|line| line.kind == b'c').ok_or(
                PhoneMediaError::MalformedSdp {
                    line: m_line.number,
                    reason: "no c= line for the audio stream".to_owned(),
                },
            )?,
        };
    let remote = SocketAddr::new(parse_connection(connection)?, port);

    let direction_in = |lines: &[Line<'_>]| {
        lines
            .iter()
            .filter_map(|line| line.attribute())
            .find_map(|(name, value)| value.is_none().then(|| Direction::from_attribute(name))?)
    };
    let direction = direction_in(media)
        .or_else(|| direction_in(session))
        .unwrap_or(Direction::SendRecv);

    let remote_key = match &offer.srtp {
        None => None,
        Some(_) => Some(answered_key(&crypto_lines)?),
    };

    Ok(PhoneAnswer {
        codec,
        payload_type,
        codec_fmtp,
        telephone_event,
        remote,
        direction,
        ptime_ms,
        remote_key,
    })
}

/// Splits SDP text into checked `x=value` lines (LF or CRLF; blank lines skipped).
fn split_lines(text: &str) -> Result<Vec<Line<'_>>, PhoneMediaError> {
    let mut lines = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        let bytes = raw.as_bytes();
        let well_formed = bytes.len() >= 2 && bytes[0].is_ascii_lowercase() && bytes[1] == b'=';
        if !well_formed {
            return Err(PhoneMediaError::MalformedSdp {
                line: number,
                reason: format!("not a <type>=<value> line: {}", excerpt(raw)),
            });
        }
        lines.push(Line {
            number,
            kind: bytes[0],
            // The first two bytes are ASCII, so index 2 is a character boundary.
            value: &raw[2..],
        });
    }
    match lines.first() {
        Some(first) if first.kind == b'v' && first.value.trim() == "0" => Ok(lines),
        Some(first) => Err(first.error("the first line must be v=0")),
        None => Err(PhoneMediaError::MalformedSdp {
            line: 0,
            reason: "empty SDP".to_owned(),
        }),
    }
}

/// `a=rtpmap:<pt> <encoding>/<clock rate>[/<channels>]`.
fn parse_rtpmap<'a>(line: &Line<'a>, value: &'a str) -> Result<RtpMap<'a>, PhoneMediaError> {
    let malformed = || line.error("a=rtpmap is not <pt> <encoding>/<rate>[/<channels>]");
    let (pt, format) = value.trim().split_once(' ').ok_or_else(malformed)?;
    let payload_type = pt
        .parse::<u8>()
        .ok()
        .filter(|&pt| pt <= 127)
        .ok_or_else(malformed)?;
    let mut parts = format.trim().split('/');
    let encoding = parts
        .next()
        .filter(|name| !name.is_empty())
        .ok_or_else(malformed)?;
    let clock_rate = parts
        .next()
        .and_then(|rate| rate.parse::<u32>().ok())
        .ok_or_else(malformed)?;
    let channels = parts.next();
    if parts.next().is_some() {
        return Err(malformed());
    }
    Ok(RtpMap {
        payload_type,
        encoding,
        clock_rate,
        channels,
    })
}

/// The codec an rtpmap names, if it is one we speak with the parameters we speak it at.
fn codec_of_rtpmap(map: &RtpMap<'_>) -> Option<PhoneCodec> {
    PhoneCodec::ALL.into_iter().find(|codec| {
        let channels_match = match map.channels {
            None => true,
            Some(channels) => channels.parse::<u8>().ok() == Some(codec.sdp_channels()),
        };
        map.encoding.eq_ignore_ascii_case(codec.name())
            && map.clock_rate == codec.clock_rate()
            && channels_match
    })
}

/// `c=IN IP4 <address>[/<ttl>[/<count>]]` or `c=IN IP6 <address>[/<count>]`.
fn parse_connection(line: &Line<'_>) -> Result<IpAddr, PhoneMediaError> {
    let mut fields = line.value.split_ascii_whitespace();
    let (Some("IN"), Some(family), Some(address), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(line.error("c= is not IN <family> <address>"));
    };
    let address = address.split('/').next().unwrap_or_default();
    let parsed: Option<IpAddr> = match family {
        "IP4" => address.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
        "IP6" => address.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6),
        _ => None,
    };
    // A host name would need a resolver; phones answer with literal addresses.
    parsed.ok_or_else(|| line.error("c= address is not a literal IPv4 or IPv6 address"))
}

/// The phone's key: the `a=crypto` with our tag, which must use our suite.
fn answered_key(crypto_lines: &[Line<'_>]) -> Result<SdesKey, PhoneMediaError> {
    for line in crypto_lines {
        let Some((_, Some(value))) = line.attribute() else {
            continue;
        };
        let tag = value.split_ascii_whitespace().next().unwrap_or_default();
        if tag.parse::<u32>().ok() != Some(CRYPTO_TAG) {
            continue;
        }
        let (_, key) = SdesKey::from_attribute(value)?;
        return Ok(key);
    }
    Err(PhoneMediaError::MissingCrypto(format!(
        "no a=crypto:{CRYPTO_TAG} {CRYPTO_SUITE} among {} crypto line(s)",
        crypto_lines.len()
    )))
}

/// A bounded, printable rendering of the phone's text for error messages.
fn excerpt(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn offer(srtp: bool) -> OfferParams {
        OfferParams {
            address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
            port: 40_000,
            codecs: vec![PhoneCodec::Opus, PhoneCodec::Pcmu, PhoneCodec::Pcma],
            session_id: 3_900_000_001,
            session_version: 1,
            srtp: srtp.then(|| SdesKey::generate(&mut StdRng::seed_from_u64(5))),
        }
    }

    /// A crlf-terminated SDP from lines.
    fn sdp(lines: &[&str]) -> String {
        lines.iter().map(|line| format!("{line}\r\n")).collect()
    }

    /// What baresip 1.0 answers for G.711 (shape from its SDP: tool, label, ssrc, rtcp-rsize).
    fn baresip_pcmu() -> String {
        sdp(&[
            "v=0",
            "o=- 1803506389 2054374232 IN IP4 127.0.0.1",
            "s=-",
            "c=IN IP4 127.0.0.1",
            "t=0 0",
            "a=tool:baresip 1.0.0",
            "m=audio 10000 RTP/AVP 0 101",
            "b=AS:80",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-15",
            "a=ptime:20",
            "a=sendrecv",
            "a=label:1",
            "a=ssrc:2684343162 cname:baresip",
            "a=rtcp-rsize",
        ])
    }

    #[test]
    fn the_offer_has_every_line() {
        let text = build_offer(&offer(false));
        let expected = sdp(&[
            "v=0",
            "o=chorus 3900000001 1 IN IP4 10.0.0.5",
            "s=chorus",
            "c=IN IP4 10.0.0.5",
            "t=0 0",
            "m=audio 40000 RTP/AVP 111 0 8 101",
            "a=rtpmap:111 opus/48000/2",
            "a=fmtp:111 useinbandfec=1;minptime=10",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-15",
            "a=ptime:20",
            "a=sendrecv",
        ]);
        assert_eq!(text, expected);
    }

    #[test]
    fn the_srtp_offer_carries_our_key() {
        let params = OfferParams {
            codecs: vec![PhoneCodec::Pcma, PhoneCodec::Pcma],
            address: "2001:db8::1".parse().expect("literal"),
            ..offer(true)
        };
        let text = build_offer(&params);
        assert!(
            text.contains("\r\nm=audio 40000 RTP/SAVP 8 101\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nc=IN IP6 2001:db8::1\r\n"));
        let crypto = text
            .lines()
            .find(|line| line.starts_with("a=crypto:"))
            .expect("crypto line");
        let (tag, key) = SdesKey::from_attribute(crypto).expect("our own attribute");
        assert_eq!(tag, CRYPTO_TAG);
        assert_eq!(Some(key), params.srtp);
        assert!(text.ends_with("\r\n") && !text.contains("\n\n"));
        assert_eq!(text.matches('\n').count(), text.matches("\r\n").count());
    }

    #[test]
    fn baresip_g711_answer() {
        let answer = parse_answer(&baresip_pcmu(), &offer(false)).expect("valid answer");
        assert_eq!(answer.codec, PhoneCodec::Pcmu);
        assert_eq!(answer.payload_type, 0);
        assert_eq!(
            answer.telephone_event,
            Some(TelephoneEventFormat {
                payload_type: 101,
                clock_rate: 8000
            })
        );
        assert_eq!(
            answer.remote,
            "127.0.0.1:10000".parse::<SocketAddr>().expect("literal")
        );
        assert_eq!(answer.direction, Direction::SendRecv);
        assert_eq!(answer.ptime_ms, Some(20));
        assert_eq!(answer.remote_key, None);
        assert_eq!(answer.codec_fmtp, None);
        assert!(answer.is_audio(0) && !answer.is_audio(8));
        assert!(answer.is_telephone_event(101) && !answer.is_telephone_event(0));
    }

    #[test]
    fn baresip_opus_answer_with_srtp_and_another_payload_type() {
        let ours = offer(true);
        let phone_key = SdesKey::generate(&mut StdRng::seed_from_u64(6));
        let crypto = format!("a={}", phone_key.to_attribute(1));
        let text = sdp(&[
            "v=0",
            "o=- 1 2 IN IP4 192.0.2.7",
            "s=-",
            "c=IN IP4 192.0.2.7",
            "t=0 0",
            "m=audio 10002 RTP/SAVP 96 100",
            "a=rtpmap:96 opus/48000/2",
            "a=fmtp:96 stereo=1;sprop-stereo=1",
            "a=rtpmap:100 telephone-event/8000",
            "a=fmtp:100 0-15",
            "a=sendrecv",
            "a=label:1",
            "a=rtcp-rsize",
            "a=ssrc:1 cname:x",
            &crypto,
        ]);
        let answer = parse_answer(&text, &ours).expect("valid answer");
        assert_eq!(answer.codec, PhoneCodec::Opus);
        assert_eq!(answer.payload_type, 96);
        assert_eq!(
            answer.codec_fmtp.as_deref(),
            Some("stereo=1;sprop-stereo=1")
        );
        assert!(answer.is_audio(96) && answer.is_audio(111));
        assert_eq!(answer.telephone_event.map(|te| te.payload_type), Some(100));
        assert!(answer.is_telephone_event(100) && answer.is_telephone_event(101));
        assert_eq!(answer.remote_key, Some(phone_key));
        assert_eq!(answer.ptime_ms, None);
        // The same answer with LF line ends.
        let lf = text.replace("\r\n", "\n");
        assert_eq!(parse_answer(&lf, &ours), Ok(answer));
    }

    #[test]
    fn sipp_answer_with_lf_and_no_direction() {
        // SIPp's phone_answer.xml, as it is on the wire after its [fields] are filled in.
        let text = "v=0\no=phone 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\n\
                    m=audio 6000 RTP/AVP 0 101\na=rtpmap:0 PCMU/8000\n\
                    a=rtpmap:101 telephone-event/8000\na=fmtp:101 0-15\na=ptime:20\n";
        let answer = parse_answer(text, &offer(false)).expect("valid answer");
        assert_eq!(answer.codec, PhoneCodec::Pcmu);
        assert_eq!(answer.remote.port(), 6000);
        assert_eq!(answer.direction, Direction::SendRecv);
    }

    #[test]
    fn levels_directions_and_static_payload_types() {
        // No rtpmap for 8 (static), media c= overrides the session one, session-level sendonly
        // overridden by media-level inactive, an earlier video m-line is skipped, an IPv6 c=.
        let text = sdp(&[
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "a=sendonly",
            "m=video 0 RTP/AVP 31",
            "m=audio 7078/2 RTP/AVP 18 8",
            "c=IN IP6 2001:db8::9",
            "a=rtpmap:18 G729/8000",
            "a=inactive",
            "a=ptime:30.0",
        ]);
        let answer = parse_answer(&text, &offer(false)).expect("valid answer");
        assert_eq!(answer.codec, PhoneCodec::Pcma);
        assert_eq!(answer.telephone_event, None);
        assert_eq!(
            answer.remote,
            "[2001:db8::9]:7078".parse::<SocketAddr>().expect("literal")
        );
        assert_eq!(answer.direction, Direction::Inactive);
        assert_eq!(answer.ptime_ms, Some(30));
        let session_only = text.replace("a=inactive\r\n", "");
        let answer = parse_answer(&session_only, &offer(false)).expect("valid answer");
        assert_eq!(answer.direction, Direction::SendOnly);
        assert!(answer.direction.phone_sends() && !answer.direction.phone_receives());
    }

    #[test]
    fn codec_preference_follows_the_answer_and_our_offer() {
        // The phone lists PCMA first: its order wins among what we offered.
        let text = baresip_pcmu()
            .replace("RTP/AVP 0 101", "RTP/AVP 8 0 101")
            .replace("a=rtpmap:0", "a=rtpmap:8 PCMA/8000\r\na=rtpmap:0");
        assert_eq!(
            parse_answer(&text, &offer(false)).expect("valid").codec,
            PhoneCodec::Pcma
        );
        // But not if we did not offer PCMA.
        let only_pcmu = OfferParams {
            codecs: vec![PhoneCodec::Pcmu],
            ..offer(false)
        };
        assert_eq!(
            parse_answer(&text, &only_pcmu).expect("valid").codec,
            PhoneCodec::Pcmu
        );
        // Opus at the wrong rate is not Opus; a phone saying "opus/48000" without channels is.
        let text = sdp(&[
            "v=0",
            "c=IN IP4 192.0.2.1",
            "m=audio 5004 RTP/AVP 97 98",
            "a=rtpmap:97 opus/16000/2",
            "a=rtpmap:98 OPUS/48000",
        ]);
        let answer = parse_answer(&text, &offer(false)).expect("valid");
        assert_eq!((answer.codec, answer.payload_type), (PhoneCodec::Opus, 98));
    }

    #[test]
    fn clear_errors() {
        let plain = offer(false);
        let cases: Vec<(String, OfferParams, &str)> = vec![
            (String::new(), plain.clone(), "malformed_sdp"),
            ("v=1\r\n".into(), plain.clone(), "malformed_sdp"),
            (
                "v=0\r\nthis is not sdp\r\n".into(),
                plain.clone(),
                "malformed_sdp",
            ),
            (
                "v=0\r\nc=IN IP4 1.2.3.4\r\n".into(),
                plain.clone(),
                "no_audio",
            ),
            (
                baresip_pcmu().replace("m=audio 10000", "m=audio 0"),
                plain.clone(),
                "media_rejected",
            ),
            (
                baresip_pcmu()
                    .replace("RTP/AVP 0 101", "RTP/AVP 18 101")
                    .replace("rtpmap:0 PCMU", "rtpmap:18 G729"),
                plain.clone(),
                "codec_mismatch",
            ),
            (
                baresip_pcmu(),
                OfferParams {
                    codecs: vec![PhoneCodec::Opus],
                    ..plain.clone()
                },
                "codec_mismatch",
            ),
            (baresip_pcmu(), offer(true), "profile_mismatch"),
            (
                baresip_pcmu().replace("RTP/AVP", "RTP/SAVP"),
                offer(true),
                "missing_crypto",
            ),
            (
                baresip_pcmu().replace("RTP/AVP", "RTP/SAVP")
                    + "a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:AAAA\r\n",
                offer(true),
                "missing_crypto",
            ),
            (
                baresip_pcmu().replace("RTP/AVP", "RTP/SAVP")
                    + "a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:AAAA\r\n",
                offer(true),
                "invalid_crypto",
            ),
            (
                baresip_pcmu().replace("c=IN IP4 127.0.0.1\r\n", ""),
                plain.clone(),
                "malformed_sdp",
            ),
            (
                baresip_pcmu().replace("IN IP4 127.0.0.1\r\nt=", "IN IP4 phone.example\r\nt="),
                plain.clone(),
                "malformed_sdp",
            ),
            (
                baresip_pcmu().replace("m=audio 10000", "m=audio 70000"),
                plain.clone(),
                "malformed_sdp",
            ),
            (
                baresip_pcmu().replace("RTP/AVP 0 101", "RTP/AVP 0 200"),
                plain.clone(),
                "malformed_sdp",
            ),
            (
                baresip_pcmu().replace("rtpmap:0 PCMU/8000", "rtpmap:0 PCMU"),
                plain.clone(),
                "malformed_sdp",
            ),
            (
                baresip_pcmu().replace("ptime:20", "ptime:soon"),
                plain.clone(),
                "malformed_sdp",
            ),
            (
                "v=0\r\nm=audio 1 RTP/AVP 0\r\n".into(),
                plain.clone(),
                "malformed_sdp",
            ),
            ("v=0\r\nm=audio\r\n".into(), plain, "no_audio"),
        ];
        for (text, params, category) in cases {
            let error = parse_answer(&text, &params).expect_err("refused");
            assert_eq!(error.category(), category, "{error} for {text:?}");
        }
        // The line number points at the culprit.
        let error = parse_answer(
            &baresip_pcmu().replace("ptime:20", "ptime:soon"),
            &offer(false),
        )
        .expect_err("refused");
        assert!(
            matches!(error, PhoneMediaError::MalformedSdp { line: 12, .. }),
            "{error}"
        );
    }

    #[test]
    fn offer_and_answer_agree_with_each_other() {
        // Our own offer, read as if the phone had echoed it, selects our first codec.
        let ours = offer(false);
        let answer = parse_answer(&build_offer(&ours), &ours).expect("valid");
        assert_eq!(answer.codec, PhoneCodec::Opus);
        assert_eq!(answer.payload_type, 111);
        assert_eq!(answer.remote, SocketAddr::new(ours.address, ours.port));
    }

    #[test]
    fn excerpts_are_bounded_and_printable() {
        let long = format!(
            "v=0\r\nc=IN IP4 {}\x07\r\nm=audio 5 RTP/AVP 0\r\n",
            "9".repeat(500)
        );
        let error = parse_answer(&long, &offer(false)).expect_err("refused");
        let message = error.to_string();
        assert!(message.len() < 200, "{message}");
        assert!(!message.contains('\x07'));
    }
}
