//! Classifying datagrams on the shared media port, and finding the ICE ufrag of a first contact.
//!
//! Hand-written: the `rtc` crate assumes one socket per peer connection, and no crate routes
//! several ICE sessions over one socket. This is the piece str0m-style servers write
//! themselves. It is pure (bytes in, verdict out), allocation-free, and never panics on any
//! input: every index is bounds-checked.
//!
//! Rules:
//! - The first byte says what a datagram is (RFC 7983 §7): 0–3 STUN, 20–63 DTLS, 128–191
//!   RTP/RTCP (RTCP when the second byte is 192–223, RFC 5761 §4). Anything else is dropped.
//! - STUN must have the magic cookie, a length that matches the datagram and is a multiple of
//!   4, and attributes that fit. A binding request's USERNAME is `<our ufrag>:<their ufrag>`
//!   (RFC 8445 §7.2.2); the part before the colon names the local session.
//! - RTP/RTCP headers must fit in the datagram (fixed header, CSRCs, extension header; RTCP's
//!   first length field). Payloads are SRTP-encrypted and are for the peer connection to judge.

/// STUN message type of a binding request (RFC 5389 §6 / §18.1).
const STUN_BINDING_REQUEST: u16 = 0x0001;
/// STUN message type of a binding success response.
const STUN_BINDING_SUCCESS: u16 = 0x0101;
/// STUN magic cookie (RFC 5389 §6).
const STUN_MAGIC_COOKIE: u32 = 0x2112_A442;
/// STUN USERNAME attribute (RFC 5389 §15.3).
const STUN_ATTR_USERNAME: u16 = 0x0006;
/// Fixed STUN header size.
const STUN_HEADER_LEN: usize = 20;
/// Fixed RTP header size (RFC 3550 §5.1).
const RTP_HEADER_LEN: usize = 12;
/// Smallest RTCP packet: header plus sender SSRC (RFC 3550 §6.4).
const RTCP_MIN_LEN: usize = 8;
/// Smallest DTLS record: its header (RFC 6347 §4.1).
const DTLS_RECORD_HEADER_LEN: usize = 13;

/// What a well-formed datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Datagram<'a> {
    /// A STUN binding request; `local_ufrag` is the first half of its USERNAME, if present.
    StunBindingRequest { local_ufrag: Option<&'a str> },
    /// Any other well-formed STUN message (responses, indications).
    Stun,
    /// A DTLS record.
    Dtls,
    /// An (S)RTP packet.
    Rtp,
    /// An (S)RTCP packet.
    Rtcp,
}

/// Why a datagram was rejected. The text goes into debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

/// Classifies one datagram, checking the headers of what it claims to be.
pub(crate) fn classify(datagram: &[u8]) -> Result<Datagram<'_>, Malformed> {
    let Some(&first) = datagram.first() else {
        return Err(Malformed("empty datagram"));
    };
    match first {
        0..=3 => classify_stun(datagram),
        20..=63 => {
            if datagram.len() < DTLS_RECORD_HEADER_LEN {
                Err(Malformed("DTLS record shorter than its header"))
            } else {
                Ok(Datagram::Dtls)
            }
        }
        128..=191 => classify_rtp_or_rtcp(datagram),
        _ => Err(Malformed("first byte is not STUN, DTLS or RTP (RFC 7983)")),
    }
}

/// Whether `datagram` is a STUN binding success response (what an ICE agent sends back for a
/// binding request that passed its integrity check).
pub(crate) fn is_binding_success(datagram: &[u8]) -> bool {
    datagram.len() >= STUN_HEADER_LEN
        && read_u16(datagram, 0) == Some(STUN_BINDING_SUCCESS)
        && read_u32(datagram, 4) == Some(STUN_MAGIC_COOKIE)
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([pair[0], pair[1]]))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let quad = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]]))
}

fn classify_stun(datagram: &[u8]) -> Result<Datagram<'_>, Malformed> {
    if datagram.len() < STUN_HEADER_LEN {
        return Err(Malformed("STUN message shorter than its 20-byte header"));
    }
    let message_type = read_u16(datagram, 0).ok_or(Malformed("STUN header"))?;
    let body_len = usize::from(read_u16(datagram, 2).ok_or(Malformed("STUN header"))?);
    if read_u32(datagram, 4) != Some(STUN_MAGIC_COOKIE) {
        return Err(Malformed("STUN message without the magic cookie"));
    }
    if !body_len.is_multiple_of(4) || STUN_HEADER_LEN + body_len != datagram.len() {
        return Err(Malformed("STUN length field does not match the datagram"));
    }
    let body = &datagram[STUN_HEADER_LEN..];
    // Walk every attribute, so a message whose attributes overrun is rejected here.
    let mut username = None;
    let mut at = 0;
    while at < body.len() {
        let attr_type = read_u16(body, at).ok_or(Malformed("truncated STUN attribute"))?;
        let attr_len =
            usize::from(read_u16(body, at + 2).ok_or(Malformed("truncated STUN attribute"))?);
        let value_start = at + 4;
        let value = body
            .get(value_start..value_start + attr_len)
            .ok_or(Malformed("STUN attribute overruns the message"))?;
        if attr_type == STUN_ATTR_USERNAME && username.is_none() {
            username = Some(value);
        }
        // Attributes are padded to a multiple of 4 bytes.
        at = value_start + attr_len.div_ceil(4) * 4;
    }
    if message_type != STUN_BINDING_REQUEST {
        return Ok(Datagram::Stun);
    }
    let local_ufrag = match username {
        None => None,
        Some(raw) => {
            let text =
                std::str::from_utf8(raw).map_err(|_| Malformed("STUN USERNAME is not UTF-8"))?;
            match text.split_once(':') {
                Some((local, _remote)) if !local.is_empty() => Some(local),
                _ => return Err(Malformed("STUN USERNAME is not `ufrag:ufrag`")),
            }
        }
    };
    Ok(Datagram::StunBindingRequest { local_ufrag })
}

fn classify_rtp_or_rtcp(datagram: &[u8]) -> Result<Datagram<'_>, Malformed> {
    // The first byte is 128..=191, so the version bits are 2.
    let second = *datagram
        .get(1)
        .ok_or(Malformed("RTP/RTCP shorter than 2 bytes"))?;
    if (192..=223).contains(&second) {
        if datagram.len() < RTCP_MIN_LEN {
            return Err(Malformed("RTCP shorter than header and SSRC"));
        }
        let words = usize::from(read_u16(datagram, 2).ok_or(Malformed("RTCP header"))?);
        if (words + 1) * 4 > datagram.len() {
            return Err(Malformed("RTCP length field overruns the datagram"));
        }
        return Ok(Datagram::Rtcp);
    }
    if datagram.len() < RTP_HEADER_LEN {
        return Err(Malformed("RTP shorter than its 12-byte header"));
    }
    let csrc_count = usize::from(datagram[0] & 0x0f);
    let mut header_len = RTP_HEADER_LEN + 4 * csrc_count;
    if datagram[0] & 0x10 != 0 {
        let ext_words = usize::from(
            read_u16(datagram, header_len + 2)
                .ok_or(Malformed("RTP extension header overruns the datagram"))?,
        );
        header_len += 4 + 4 * ext_words;
    }
    if header_len > datagram.len() {
        return Err(Malformed(
            "RTP header (CSRCs, extensions) overruns the datagram",
        ));
    }
    Ok(Datagram::Rtp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(message_type: u16, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (attr_type, value) in attributes {
            body.extend_from_slice(&attr_type.to_be_bytes());
            body.extend_from_slice(&(value.len() as u16).to_be_bytes());
            body.extend_from_slice(value);
            while !body.len().is_multiple_of(4) {
                body.push(0);
            }
        }
        let mut message = Vec::new();
        message.extend_from_slice(&message_type.to_be_bytes());
        message.extend_from_slice(&(body.len() as u16).to_be_bytes());
        message.extend_from_slice(&STUN_MAGIC_COOKIE.to_be_bytes());
        message.extend_from_slice(&[7; 12]);
        message.extend_from_slice(&body);
        message
    }

    #[test]
    fn binding_request_yields_the_local_ufrag() {
        let request = stun(0x0001, &[(0x0006, b"srvUfrag:cli1"), (0x8022, b"x")]);
        assert_eq!(
            classify(&request),
            Ok(Datagram::StunBindingRequest {
                local_ufrag: Some("srvUfrag")
            })
        );
    }

    #[test]
    fn binding_request_without_username_is_routed_by_address() {
        let request = stun(0x0001, &[]);
        assert_eq!(
            classify(&request),
            Ok(Datagram::StunBindingRequest { local_ufrag: None })
        );
    }

    #[test]
    fn binding_response_is_plain_stun() {
        let response = stun(0x0101, &[(0x0020, &[0; 8])]);
        assert_eq!(classify(&response), Ok(Datagram::Stun));
        assert!(is_binding_success(&response));
        assert!(!is_binding_success(&stun(0x0001, &[])));
    }

    #[test]
    fn broken_stun_is_malformed() {
        let good = stun(0x0001, &[(0x0006, b"a:b")]);
        // Truncated header, truncated body, bad cookie, overrunning attribute, bad username.
        assert!(classify(&good[..10]).is_err());
        assert!(classify(&good[..good.len() - 4]).is_err());
        let mut bad_cookie = good.clone();
        bad_cookie[4] ^= 0xff;
        assert!(classify(&bad_cookie).is_err());
        let mut overrun = good.clone();
        overrun[22..24].copy_from_slice(&200u16.to_be_bytes());
        assert!(classify(&overrun).is_err());
        assert!(classify(&stun(0x0001, &[(0x0006, b"nocolon")])).is_err());
        assert!(classify(&stun(0x0001, &[(0x0006, &[0xff, 0xfe, b':'])])).is_err());
    }

    #[test]
    fn rtp_and_rtcp_headers_are_checked() {
        let mut rtp = vec![0x80, 111, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4, 0xaa, 0xbb];
        assert_eq!(classify(&rtp), Ok(Datagram::Rtp));
        rtp[0] = 0x8f; // 15 CSRCs that are not there
        assert!(classify(&rtp).is_err());
        rtp[0] = 0x90; // extension bit, extension header missing
        assert!(classify(&rtp[..12]).is_err());
        let rtcp = [0x80, 200, 0, 1, 1, 2, 3, 4];
        assert_eq!(classify(&rtcp), Ok(Datagram::Rtcp));
        let rtcp_overrun = [0x80, 200, 0, 9, 1, 2, 3, 4];
        assert!(classify(&rtcp_overrun).is_err());
    }

    #[test]
    fn other_first_bytes_are_malformed() {
        assert!(classify(&[]).is_err());
        assert!(classify(&[0xff; 40]).is_err());
        assert!(classify(&[70; 40]).is_err());
        assert_eq!(classify(&[22; 20]), Ok(Datagram::Dtls));
        assert!(classify(&[22; 5]).is_err());
    }

    #[test]
    fn never_panics_on_any_short_input() {
        for len in 0..64 {
            for first in [0u8, 1, 3, 20, 63, 128, 0x90, 0x9f, 191] {
                let mut datagram = vec![0xa5u8; len];
                if let Some(byte) = datagram.first_mut() {
                    *byte = first;
                }
                let _ = classify(&datagram);
            }
        }
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever arrives on the media port, classifying it never panics.
        #[test]
        fn classify_never_panics(datagram in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = super::classify(&datagram);
            let _ = super::is_binding_success(&datagram);
        }

        /// STUN-looking headers (first two bits zero, magic cookie) with random bodies.
        #[test]
        fn stunlike_never_panics(kind in any::<u16>(), len in any::<u16>(), body in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut d = Vec::with_capacity(20 + body.len());
            d.extend_from_slice(&(kind & 0x3fff).to_be_bytes());
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&0x2112_A442u32.to_be_bytes());
            d.extend_from_slice(&[7; 12]);
            d.extend_from_slice(&body);
            let _ = super::classify(&d);
            let _ = super::is_binding_success(&d);
        }
    }
}
