//! Checking a participant's SDP offer before the WebRTC stack sees it.
//!
//! The `rtc` crate parses SDP and negotiates, but its errors name internal states
//! (`ErrSessionDescriptionMissingIceUfrag`, ...). An application developer calling the join API
//! needs to read what is wrong with the offer instead. So this module parses the offer with
//! `rtc`'s SDP parser and checks, in order, what Chorus needs: parseable SDP; exactly one audio
//! section, not rejected; Opus at 48000 Hz with 2 channels; sendrecv, or recvonly for a listener
//! who only hears; ICE credentials; a DTLS fingerprint. The RFC 6464 audio-level extension is
//! optional: without it, levels are `None`.
//!
//! A recvonly offer is answered by Chorus's own listener transport (`listener.rs`), which needs
//! the offer's parameters itself; [`CheckedOffer`] carries them.

use rtc::peer_connection::sdp::RTCSessionDescription;

use super::EndpointError;

/// The RFC 6464 client-to-mixer audio level header extension.
pub(crate) const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Largest offer accepted; real audio offers are a few kilobytes.
const MAX_OFFER_BYTES: usize = 64 * 1024;

/// What the checks learned about an acceptable offer.
#[derive(Debug)]
pub(crate) struct CheckedOffer {
    /// The parsed offer, ready for `set_remote_description`.
    pub(crate) description: RTCSessionDescription,
    /// `a=recvonly`: the participant only listens.
    pub(crate) receive_only: bool,
    /// The offer's payload type for opus/48000/2 (the lowest, if several).
    pub(crate) opus_payload_type: u8,
    /// The audio section's `a=mid`, if any.
    pub(crate) mid: Option<String>,
    /// Whether the offer groups its sections with `a=group:BUNDLE`.
    pub(crate) bundle: bool,
    /// The participant's ICE username fragment.
    pub(crate) ice_ufrag: String,
    /// The participant's DTLS certificate fingerprints: (hash function, value).
    pub(crate) fingerprints: Vec<(String, String)>,
    /// The participant's `a=setup` role (`actpass`, `active` or `passive`), if given.
    pub(crate) setup: Option<String>,
}

/// Checks `sdp` and returns it parsed, or an error saying what is wrong with it.
pub(crate) fn check_offer(sdp: &str) -> Result<CheckedOffer, EndpointError> {
    if sdp.trim().is_empty() {
        return Err(EndpointError::MalformedSdp("the offer is empty".into()));
    }
    if sdp.len() > MAX_OFFER_BYTES {
        return Err(EndpointError::MalformedSdp(format!(
            "the offer is {} bytes; at most {MAX_OFFER_BYTES} are accepted",
            sdp.len()
        )));
    }
    if !sdp.trim_start().starts_with("v=") {
        return Err(EndpointError::MalformedSdp(
            "the offer does not start with `v=0` (is it SDP, or JSON around SDP?)".into(),
        ));
    }
    // The SDP grammar wants CRLF; many clients and hand-written offers use LF alone.
    let normalized = if sdp.contains("\r\n") {
        sdp.to_owned()
    } else {
        sdp.replace('\n', "\r\n")
    };
    let description = RTCSessionDescription::offer(normalized)
        .map_err(|err| EndpointError::MalformedSdp(format!("the offer is not valid SDP: {err}")))?;
    let parsed = description
        .unmarshal()
        .map_err(|err| EndpointError::MalformedSdp(format!("the offer is not valid SDP: {err}")))?;

    let audio: Vec<_> = parsed
        .media_descriptions
        .iter()
        .filter(|media| media.media_name.media == "audio")
        .collect();
    let section = match audio.as_slice() {
        [] => {
            return Err(EndpointError::UnsupportedOffer(
                "the offer has no audio (`m=audio`) section".into(),
            ));
        }
        [one] => *one,
        many => {
            return Err(EndpointError::UnsupportedOffer(format!(
                "the offer has {} audio sections; a participant sends exactly one",
                many.len()
            )));
        }
    };
    if section.media_name.port.value == 0 {
        return Err(EndpointError::UnsupportedOffer(
            "the audio section is rejected (port 0)".into(),
        ));
    }

    let codecs = section.codecs();
    let opus_payload_type = codecs
        .iter()
        .filter(|(_, codec)| {
            codec.name.eq_ignore_ascii_case("opus")
                && codec.clock_rate == 48_000
                && codec.encoding_parameters.trim() == "2"
        })
        .map(|(pt, _)| *pt)
        .min();
    let Some(opus_payload_type) = opus_payload_type else {
        let mut offered: Vec<String> = codecs
            .values()
            .map(|codec| {
                let mut name = format!("{}/{}", codec.name, codec.clock_rate);
                if !codec.encoding_parameters.is_empty() {
                    name.push('/');
                    name.push_str(&codec.encoding_parameters);
                }
                name
            })
            .collect();
        offered.sort();
        let offered = if offered.is_empty() {
            "no a=rtpmap codecs".to_owned()
        } else {
            offered.join(", ")
        };
        return Err(EndpointError::UnsupportedOffer(format!(
            "the audio section does not offer opus/48000/2 (it offers: {offered})"
        )));
    };

    for direction in ["sendonly", "inactive"] {
        if section.has_attribute(direction) {
            return Err(EndpointError::UnsupportedOffer(format!(
                "the audio section is `a={direction}`; a participant must be sendrecv \
                 (or recvonly, to listen only)"
            )));
        }
    }
    let receive_only = section.has_attribute("recvonly");

    let session_or_media = |key: &str| {
        section
            .attribute(key)
            .flatten()
            .map(str::to_owned)
            .or_else(|| parsed.attribute(key).cloned())
            .filter(|value| !value.trim().is_empty())
    };
    let (Some(ice_ufrag), Some(_)) = (session_or_media("ice-ufrag"), session_or_media("ice-pwd"))
    else {
        return Err(EndpointError::MalformedSdp(
            "the offer has no ICE credentials (`a=ice-ufrag` and `a=ice-pwd`)".into(),
        ));
    };
    let mut fingerprint_lines: Vec<String> = section
        .attributes
        .iter()
        .filter(|a| a.key == "fingerprint")
        .filter_map(|a| a.value.clone())
        .collect();
    if fingerprint_lines.is_empty() {
        fingerprint_lines = parsed
            .attributes
            .iter()
            .filter(|a| a.key == "fingerprint")
            .filter_map(|a| a.value.clone())
            .collect();
    }
    let fingerprints: Vec<(String, String)> = fingerprint_lines
        .iter()
        .filter_map(|line| {
            let (hash, value) = line.trim().split_once(' ')?;
            Some((hash.to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect();
    if fingerprints.is_empty() {
        return Err(EndpointError::MalformedSdp(
            "the offer has no DTLS fingerprint (`a=fingerprint`)".into(),
        ));
    }
    let bundle = parsed
        .attribute("group")
        .is_some_and(|group| group.trim_start().starts_with("BUNDLE"));

    Ok(CheckedOffer {
        description,
        receive_only,
        opus_payload_type,
        mid: session_or_media("mid"),
        bundle,
        ice_ufrag: ice_ufrag.trim().to_owned(),
        fingerprints,
        setup: session_or_media("setup").map(|s| s.trim().to_ascii_lowercase()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "v=0\r\n\
o=- 1 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=fingerprint:sha-256 AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
c=IN IP4 0.0.0.0\r\n\
a=mid:0\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwxyz\r\n\
a=setup:actpass\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
a=sendrecv\r\n";

    fn message(sdp: &str) -> String {
        check_offer(sdp)
            .err()
            .map(|err| err.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_good_offer_passes() {
        check_offer(GOOD).unwrap();
        check_offer(&GOOD.replace("\r\n", "\n")).unwrap();
    }

    #[test]
    fn each_problem_gets_its_own_message() {
        assert!(message("").contains("empty"));
        assert!(message("{\"type\":\"offer\"}").contains("v=0"));
        assert!(message("v=0\r\nthis is not sdp\r\n").contains("not valid SDP"));
        assert!(message(&GOOD.replace("m=audio", "m=video")).contains("no audio"));
        assert!(message(&GOOD.replace("opus/48000/2", "PCMU/8000")).contains("PCMU/8000"));
        assert!(message(&GOOD.replace("a=sendrecv", "a=sendonly")).contains("sendonly"));
        assert!(message(&GOOD.replace("a=sendrecv", "a=inactive")).contains("inactive"));
        assert!(message(&GOOD.replace("a=ice-ufrag:abcd\r\n", "")).contains("ICE credentials"));
        assert!(message(&GOOD.replace("a=fingerprint", "a=x-fingerprint")).contains("fingerprint"));
        assert!(message(&GOOD.replace("m=audio 9", "m=audio 0")).contains("port 0"));
    }

    #[test]
    fn a_listener_offer_passes_and_says_what_the_listener_transport_needs() {
        let offer = check_offer(&GOOD.replace("a=sendrecv", "a=recvonly")).unwrap();
        assert!(offer.receive_only);
        assert_eq!(offer.opus_payload_type, 111);
        assert_eq!(offer.mid.as_deref(), Some("0"));
        assert!(offer.bundle);
        assert_eq!(offer.ice_ufrag, "abcd");
        assert_eq!(offer.setup.as_deref(), Some("actpass"));
        assert_eq!(offer.fingerprints.len(), 1);
        assert_eq!(offer.fingerprints[0].0, "sha-256");
        assert!(offer.fingerprints[0].1.starts_with("AB:CD"));
        assert!(!check_offer(GOOD).unwrap().receive_only);
    }

    #[test]
    fn malformed_sdp_has_the_right_category() {
        let err = check_offer("v=0\r\nm=\r\n").unwrap_err();
        assert_eq!(err.category(), "sdp_malformed");
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    const BROWSER_LIKE: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\na=setup:actpass\r\na=sendrecv\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Arbitrary text never panics the offer checks.
        #[test]
        fn arbitrary_text(text in ".{0,2000}") {
            let _ = super::check_offer(&text);
        }

        /// A plausible offer with one line cut, duplicated or garbled never panics either.
        #[test]
        fn mutated_offer(line in 0usize..16, action in 0u8..3, junk in "[ -~]{0,40}") {
            let mut lines: Vec<String> = BROWSER_LIKE.split("\r\n").map(str::to_owned).collect();
            let i = line % lines.len();
            match action {
                0 => { lines.remove(i); }
                1 => { let l = lines[i].clone(); lines.insert(i, l); }
                _ => lines[i] = junk,
            }
            let _ = super::check_offer(&lines.join("\r\n"));
        }
    }
}
