//! Property tests ("fuzzing" on stable Rust) of the phone leg's parsers: RTP datagrams, RFC 4733
//! payloads, SDP answers and SRTP packets all come from a phone we do not control. The property
//! is always the same: any input gets an `Ok` or a clear `Err`, never a panic.

use std::net::{IpAddr, Ipv4Addr};

use chorus_mediaserver::telephony::media::PhoneCodec;
use chorus_mediaserver::telephony::media::dtmf::{DtmfDetector, TelephoneEvent};
use chorus_mediaserver::telephony::media::rtp::RtpPacket;
use chorus_mediaserver::telephony::media::sdp::{OfferParams, build_offer, parse_answer};
use chorus_mediaserver::telephony::media::srtp::{SdesKey, SrtpSession};
use proptest::prelude::*;

const KEY: SdesKey = SdesKey {
    master_key: [7; 16],
    master_salt: [9; 14],
};

fn offer(srtp: bool) -> OfferParams {
    OfferParams {
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 40_000,
        codecs: PhoneCodec::ALL.to_vec(),
        session_id: 1,
        session_version: 1,
        srtp: srtp.then_some(KEY),
    }
}

/// An SDP-shaped line: a known type letter and attribute-ish text.
fn sdp_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[vocstmab]=[ -~]{0,40}",
        "m=audio [0-9]{1,6} RTP/S?AVP( [0-9]{1,3}){0,5}",
        "c=IN IP[46] [0-9a-f.:/]{0,30}",
        "a=rtpmap:[0-9]{1,3} [A-Za-z-]{0,16}(/[0-9]{0,6}){0,3}",
        "a=(sendrecv|sendonly|recvonly|inactive|ptime:[0-9.]{0,5}|fmtp:[0-9]{1,3} [ -~]{0,20})",
        "a=crypto:[0-9]{0,3} AES_CM_128_HMAC_SHA1_(80|32) inline:[A-Za-z0-9+/=|:^;]{0,50}( [ -~]{0,10})?",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn rtp_datagrams(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(packet) = RtpPacket::parse(&bytes) {
            prop_assert!(packet.payload.len() + 12 <= bytes.len());
        }
    }

    #[test]
    fn rtp_datagrams_with_a_valid_first_byte(
        first in 0x80u8..=0xBF,
        rest in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let mut bytes = vec![first];
        bytes.extend(rest);
        let _ = RtpPacket::parse(&bytes);
    }

    #[test]
    fn telephone_events(packets in proptest::collection::vec(
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..8)), 0..40,
    )) {
        let mut detector = DtmfDetector::new();
        for (timestamp, payload) in &packets {
            let _ = TelephoneEvent::parse(payload);
            if let Ok(presses) = detector.push(*timestamp, payload) {
                prop_assert!(presses.len() <= 2);
            }
        }
        let _ = detector.flush();
    }

    #[test]
    fn sdp_answers_as_any_text(text in ".{0,400}", srtp in any::<bool>()) {
        let _ = parse_answer(&text, &offer(srtp));
    }

    #[test]
    fn sdp_answers_as_sdp_lines(
        lines in proptest::collection::vec(sdp_line(), 0..14),
        crlf in any::<bool>(),
        srtp in any::<bool>(),
    ) {
        let end = if crlf { "\r\n" } else { "\n" };
        let text: String = std::iter::once("v=0".to_owned())
            .chain(lines)
            .map(|line| line + end)
            .collect();
        let _ = parse_answer(&text, &offer(srtp));
    }

    #[test]
    fn sdp_answers_from_our_offer_with_a_flipped_byte(pos in 0usize..1000, byte in any::<u8>()) {
        let mut bytes = build_offer(&offer(true)).into_bytes();
        let at = pos % bytes.len();
        bytes[at] = byte;
        if let Ok(text) = String::from_utf8(bytes) {
            let _ = parse_answer(&text, &offer(true));
        }
    }

    /// The other side of the property: unknown attributes never spoil a good answer.
    #[test]
    fn good_answers_survive_unknown_attributes(
        extra in proptest::collection::vec("a=x-[a-z]{1,8}(:[ -~]{0,30})?", 0..6),
        crlf in any::<bool>(),
    ) {
        let end = if crlf { "\r\n" } else { "\n" };
        let mut lines = vec![
            "v=0".to_owned(),
            "o=- 1 2 IN IP4 127.0.0.1".to_owned(),
            "s=-".to_owned(),
            "c=IN IP4 127.0.0.1".to_owned(),
            "t=0 0".to_owned(),
            "m=audio 10000 RTP/AVP 0 101".to_owned(),
            "a=rtpmap:0 PCMU/8000".to_owned(),
        ];
        lines.extend(extra);
        let text: String = lines.into_iter().map(|line| line + end).collect();
        let answer = parse_answer(&text, &offer(false)).unwrap();
        prop_assert_eq!(answer.codec, PhoneCodec::Pcmu);
        prop_assert_eq!(answer.remote.port(), 10000);
    }

    #[test]
    fn srtp_packets(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut session = SrtpSession::new(&KEY, &KEY).unwrap();
        prop_assert!(session.unprotect(&bytes).is_err());
        let _ = session.unprotect_rtcp(&bytes);
    }

    #[test]
    fn srtp_packets_with_a_flipped_bit(
        payload in proptest::collection::vec(any::<u8>(), 0..100),
        pos in 0usize..200,
        bit in 0u8..8,
    ) {
        let mut rtp = vec![0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 9];
        rtp.extend(&payload);
        let mut sender = SrtpSession::new(&KEY, &KEY).unwrap();
        let mut receiver = SrtpSession::new(&KEY, &KEY).unwrap();
        let mut protected = sender.protect(&rtp).unwrap();
        let at = pos % protected.len();
        protected[at] ^= 1 << bit;
        prop_assert!(receiver.unprotect(&protected).is_err());
    }
}
