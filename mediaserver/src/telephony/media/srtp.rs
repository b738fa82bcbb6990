//! SDES-SRTP for the phone leg: keys exchanged in SDP `a=crypto` lines (RFC 4568) and SRTP
//! (RFC 3711) with the `AES_CM_128_HMAC_SHA1_80` suite, the one every SRTP phone supports.
//!
//! The cryptography is `rtc`'s SRTP (`rtc::srtp`, the `rtc-srtp` crate the WebRTC side already
//! uses), driven through its public `Context`; only the key exchange format is ours. SDES keys
//! travel in the SIP signalling, so they are only as secret as that is: the call layer must send
//! them over SIP/TLS only (DESIGN.md §11).
//!
//! Invariants:
//! - an [`SrtpSession`] encrypts with our key and decrypts with the phone's (SRTP contexts are
//!   one-directional), and refuses replayed or tampered packets;
//! - the inbound state is bounded: at most [`MAX_INBOUND_SSRCS`] SSRCs per direction of RTP and
//!   RTCP, however many forged packets arrive;
//! - key material never appears in `Debug` output or in errors;
//! - attributes we cannot honour exactly (MKI, several keys, session parameters that change the
//!   packet format or key derivation) are refused rather than half-understood.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::CryptoRng;
use rtc::srtp::context::Context;
use rtc::srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use rtc::srtp::protection_profile::ProtectionProfile;

use super::PhoneMediaError;

/// The one crypto suite we offer and accept (RFC 4568 §6.2.1).
pub const CRYPTO_SUITE: &str = "AES_CM_128_HMAC_SHA1_80";
/// Master key length of the suite, in bytes.
pub const MASTER_KEY_LEN: usize = 16;
/// Master salt length of the suite, in bytes.
pub const MASTER_SALT_LEN: usize = 14;
/// Bytes SRTP adds to an RTP packet with this suite (the 80-bit authentication tag).
pub const SRTP_OVERHEAD: usize = 10;

/// Replay window, in packets: RFC 3711 §3.3.2's minimum of 64 is too tight for a phone leg whose
/// packets may cross a jittery enterprise WAN; 128 costs nothing.
const REPLAY_WINDOW: usize = 128;

/// How many distinct SSRCs the inbound direction keeps state for (RTP and RTCP each). `rtc`'s
/// context creates per-SSRC state before it authenticates a packet, so without a bound every
/// forged packet with a fresh SSRC would cost memory. A phone uses one SSRC, occasionally a new
/// one after a re-INVITE; eight leaves room for that.
pub const MAX_INBOUND_SSRCS: usize = 8;

/// One SDES master key and salt.
#[derive(Clone, PartialEq, Eq)]
pub struct SdesKey {
    /// The AES-128 master key.
    pub master_key: [u8; MASTER_KEY_LEN],
    /// The 112-bit master salt.
    pub master_salt: [u8; MASTER_SALT_LEN],
}

impl std::fmt::Debug for SdesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys end up next to calls in logs; never print them.
        f.write_str("SdesKey { .. }")
    }
}

impl SdesKey {
    /// A fresh key and salt from a cryptographically secure generator (e.g. `rand::rng()`).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut master_key = [0; MASTER_KEY_LEN];
        let mut master_salt = [0; MASTER_SALT_LEN];
        rng.fill_bytes(&mut master_key);
        rng.fill_bytes(&mut master_salt);
        Self {
            master_key,
            master_salt,
        }
    }

    /// The key parameter of an `a=crypto` line: `inline:` and the base64 of key then salt.
    pub fn to_inline(&self) -> String {
        let mut concatenated = [0; MASTER_KEY_LEN + MASTER_SALT_LEN];
        concatenated[..MASTER_KEY_LEN].copy_from_slice(&self.master_key);
        concatenated[MASTER_KEY_LEN..].copy_from_slice(&self.master_salt);
        format!("inline:{}", BASE64.encode(concatenated))
    }

    /// The value of an `a=crypto` attribute offering this key under `tag`:
    /// `crypto:<tag> AES_CM_128_HMAC_SHA1_80 inline:<key>` (prefix it with `a=`).
    pub fn to_attribute(&self, tag: u32) -> String {
        format!("crypto:{tag} {CRYPTO_SUITE} {}", self.to_inline())
    }

    /// Parses a key parameter: `inline:<base64>` with an optional lifetime (`|2^31`, ignored:
    /// a call never reaches it). An MKI (`|1:4`) is refused, because `rtc`'s SRTP cannot carry
    /// one in packets.
    pub fn from_inline(key_params: &str) -> Result<Self, PhoneMediaError> {
        if key_params.contains(';') {
            return Err(invalid("several master keys are not supported"));
        }
        let encoded = key_params
            .strip_prefix("inline:")
            .ok_or_else(|| invalid("key parameter is not inline:"))?;
        let mut parts = encoded.split('|');
        let key_salt = parts.next().unwrap_or_default();
        for extra in parts {
            if extra.contains(':') {
                return Err(invalid("MKI is not supported"));
            }
            let lifetime_ok = match extra.strip_prefix("2^") {
                Some(power) => power.parse::<u8>().is_ok(),
                None => extra.parse::<u64>().is_ok(),
            };
            if !lifetime_ok {
                return Err(invalid("unreadable key lifetime"));
            }
        }
        let bytes = BASE64
            .decode(key_salt)
            .map_err(|_| invalid("key is not base64"))?;
        if bytes.len() != MASTER_KEY_LEN + MASTER_SALT_LEN {
            return Err(PhoneMediaError::InvalidCrypto(format!(
                "key and salt are {} bytes, the suite needs {}",
                bytes.len(),
                MASTER_KEY_LEN + MASTER_SALT_LEN
            )));
        }
        let (key, salt) = bytes.split_at(MASTER_KEY_LEN);
        Ok(Self {
            master_key: key.try_into().expect("split at the key length"),
            master_salt: salt.try_into().expect("total length checked above"),
        })
    }

    /// Parses an `a=crypto` attribute (with or without the `a=` and `crypto:` prefixes) into its
    /// tag and key. The suite must be [`CRYPTO_SUITE`]. Session parameters are refused except
    /// `WSH=` (a window size hint, harmless to ignore) and `KDR=0` (what we do anyway).
    pub fn from_attribute(text: &str) -> Result<(u32, Self), PhoneMediaError> {
        let text = text.trim();
        let text = text.strip_prefix("a=").unwrap_or(text);
        let text = text.strip_prefix("crypto:").unwrap_or(text);
        let mut fields = text.split_ascii_whitespace();
        let tag = fields
            .next()
            .filter(|tag| (1..=9).contains(&tag.len()) && tag.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|tag| tag.parse::<u32>().ok())
            .ok_or_else(|| invalid("tag is not 1 to 9 digits"))?;
        let suite = fields.next().ok_or_else(|| invalid("no crypto suite"))?;
        if suite != CRYPTO_SUITE {
            return Err(PhoneMediaError::InvalidCrypto(format!(
                "suite {} is not {CRYPTO_SUITE}",
                printable(suite)
            )));
        }
        let key = Self::from_inline(fields.next().ok_or_else(|| invalid("no key parameter"))?)?;
        for parameter in fields {
            let harmless = parameter.starts_with("WSH=") || parameter == "KDR=0";
            if !harmless {
                return Err(PhoneMediaError::InvalidCrypto(format!(
                    "session parameter {} is not supported",
                    printable(parameter)
                )));
            }
        }
        Ok((tag, key))
    }
}

/// The SRTP state of one phone call: our outbound context and the phone's inbound one.
pub struct SrtpSession {
    outbound: Context,
    inbound: Context,
    /// SSRCs the inbound context has state for (see [`MAX_INBOUND_SSRCS`]).
    inbound_rtp_ssrcs: Vec<u32>,
    inbound_rtcp_ssrcs: Vec<u32>,
}

impl std::fmt::Debug for SrtpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpSession").finish_non_exhaustive()
    }
}

impl SrtpSession {
    /// A session that protects with `local` (the key we offered) and unprotects with `remote`
    /// (the key in the phone's answer).
    pub fn new(local: &SdesKey, remote: &SdesKey) -> Result<Self, PhoneMediaError> {
        let provider =
            rtc::srtp::crypto::default_provider().map_err(|error| PhoneMediaError::Srtp {
                operation: "context",
                reason: error.to_string(),
            })?;
        let context = |key: &SdesKey, replay_protection: bool| {
            let (srtp_replay, srtcp_replay) = if replay_protection {
                (
                    Some(srtp_replay_protection(REPLAY_WINDOW)),
                    Some(srtcp_replay_protection(REPLAY_WINDOW)),
                )
            } else {
                // The sending side never sees its own packets twice.
                (None, None)
            };
            Context::new(
                &key.master_key,
                &key.master_salt,
                ProtectionProfile::Aes128CmHmacSha1_80,
                srtp_replay,
                srtcp_replay,
                provider.crypto(),
            )
            .map_err(|error| PhoneMediaError::Srtp {
                operation: "context",
                reason: error.to_string(),
            })
        };
        Ok(Self {
            outbound: context(local, false)?,
            inbound: context(remote, true)?,
            inbound_rtp_ssrcs: Vec::new(),
            inbound_rtcp_ssrcs: Vec::new(),
        })
    }

    /// Encrypts and authenticates one RTP packet for the phone.
    pub fn protect(&mut self, rtp: &[u8]) -> Result<Vec<u8>, PhoneMediaError> {
        self.outbound
            .encrypt_rtp(rtp)
            .map(|packet| packet.to_vec())
            .map_err(|error| srtp_error("protect", &error))
    }

    /// Authenticates and decrypts one SRTP packet from the phone. Tampered, replayed, truncated
    /// or foreign packets are refused.
    /// Packets from a new SSRC once [`MAX_INBOUND_SSRCS`] have been seen are refused unread.
    pub fn unprotect(&mut self, srtp: &[u8]) -> Result<Vec<u8>, PhoneMediaError> {
        // The SSRC sits at bytes 8..12 of the RTP header.
        admit_ssrc(&mut self.inbound_rtp_ssrcs, srtp.get(8..12), "unprotect")?;
        self.inbound
            .decrypt_rtp(srtp)
            .map(|packet| packet.to_vec())
            .map_err(|error| srtp_error("unprotect", &error))
    }

    /// Encrypts and authenticates one RTCP compound packet for the phone.
    pub fn protect_rtcp(&mut self, rtcp: &[u8]) -> Result<Vec<u8>, PhoneMediaError> {
        self.outbound
            .encrypt_rtcp(rtcp)
            .map(|packet| packet.to_vec())
            .map_err(|error| srtp_error("protect_rtcp", &error))
    }

    /// Authenticates and decrypts one SRTCP packet from the phone.
    /// Packets from a new SSRC once [`MAX_INBOUND_SSRCS`] have been seen are refused unread.
    pub fn unprotect_rtcp(&mut self, srtcp: &[u8]) -> Result<Vec<u8>, PhoneMediaError> {
        // The sender's SSRC sits at bytes 4..8 of the first RTCP header.
        admit_ssrc(
            &mut self.inbound_rtcp_ssrcs,
            srtcp.get(4..8),
            "unprotect_rtcp",
        )?;
        self.inbound
            .decrypt_rtcp(srtcp)
            .map(|packet| packet.to_vec())
            .map_err(|error| srtp_error("unprotect_rtcp", &error))
    }
}

/// Records the SSRC of an inbound packet, or refuses it when it would be one SSRC too many.
/// Packets too short to hold an SSRC go through: the context refuses them without keeping state.
fn admit_ssrc(
    seen: &mut Vec<u32>,
    ssrc_bytes: Option<&[u8]>,
    operation: &'static str,
) -> Result<(), PhoneMediaError> {
    let Some(ssrc) = ssrc_bytes
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map(u32::from_be_bytes)
    else {
        return Ok(());
    };
    if seen.contains(&ssrc) {
        return Ok(());
    }
    if seen.len() >= MAX_INBOUND_SSRCS {
        return Err(PhoneMediaError::Srtp {
            operation,
            reason: format!("more than {MAX_INBOUND_SSRCS} SSRCs from the phone"),
        });
    }
    seen.push(ssrc);
    Ok(())
}

fn invalid(reason: &str) -> PhoneMediaError {
    PhoneMediaError::InvalidCrypto(reason.to_owned())
}

fn srtp_error(operation: &'static str, error: &dyn std::fmt::Display) -> PhoneMediaError {
    PhoneMediaError::Srtp {
        operation,
        reason: error.to_string(),
    }
}

/// A bounded, printable rendering of a field from the phone, for error messages.
fn printable(field: &str) -> String {
    field
        .chars()
        .take(40)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::telephony::media::rtp::RtpHeader;

    /// RFC 3711 Appendix B.3's master key and salt.
    const RFC3711_KEY: SdesKey = SdesKey {
        master_key: [
            0xE1, 0xF9, 0x7A, 0x0D, 0x3E, 0x01, 0x8B, 0xE0, 0xD6, 0x4F, 0xA3, 0x2C, 0x06, 0xDE,
            0x41, 0x39,
        ],
        master_salt: [
            0x0E, 0xC6, 0x75, 0xAD, 0x49, 0x8A, 0xFE, 0xEB, 0xB6, 0x96, 0x0B, 0x3A, 0xAB, 0xE6,
        ],
    };

    /// libsrtp's `srtp_validate` reference packet (SSRC 0xcafebabe, sequence 0x1234, 14 bytes
    /// of 0xab) with the key above, before and after protection.
    const PLAINTEXT: [u8; 28] = [
        0x80, 0x0F, 0x12, 0x34, 0xDE, 0xCA, 0xFB, 0xAD, 0xCA, 0xFE, 0xBA, 0xBE, 0xAB, 0xAB, 0xAB,
        0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB,
    ];
    const CIPHERTEXT: [u8; 38] = [
        0x80, 0x0F, 0x12, 0x34, 0xDE, 0xCA, 0xFB, 0xAD, 0xCA, 0xFE, 0xBA, 0xBE, 0x4E, 0x55, 0xDC,
        0x4C, 0xE7, 0x99, 0x78, 0xD8, 0x8C, 0xA4, 0xD2, 0x15, 0x94, 0x9D, 0x24, 0x02, 0xB7, 0x8D,
        0x6A, 0xCC, 0x99, 0xEA, 0x17, 0x9B, 0x8D, 0xBB,
    ];

    fn packet(sequence: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        RtpHeader {
            marker: false,
            payload_type: 0,
            sequence,
            timestamp: u32::from(sequence) * 160,
            ssrc: 0x1234_5678,
        }
        .write_packet(payload, &mut out);
        out
    }

    #[test]
    fn known_answer_from_libsrtp() {
        let mut session = SrtpSession::new(&RFC3711_KEY, &RFC3711_KEY).expect("valid keys");
        assert_eq!(session.protect(&PLAINTEXT).expect("protects"), CIPHERTEXT);
        assert_eq!(
            session.unprotect(&CIPHERTEXT).expect("authentic"),
            PLAINTEXT
        );
    }

    #[test]
    fn round_trip_between_two_ends() {
        let mut rng = StdRng::seed_from_u64(7);
        let ours = SdesKey::generate(&mut rng);
        let phones = SdesKey::generate(&mut rng);
        assert_ne!(ours, phones);
        let mut server = SrtpSession::new(&ours, &phones).expect("valid keys");
        let mut phone = SrtpSession::new(&phones, &ours).expect("valid keys");
        for sequence in [65_530u16, 65_535, 0, 1, 2] {
            let plain = packet(sequence, &[0xD5; 160]);
            let protected = server.protect(&plain).expect("protects");
            assert_eq!(protected.len(), plain.len() + SRTP_OVERHEAD);
            assert_ne!(&protected[12..172], &plain[12..]);
            assert_eq!(phone.unprotect(&protected).expect("authentic"), plain);

            let back = phone.protect(&plain).expect("protects");
            assert_eq!(server.unprotect(&back).expect("authentic"), plain);
        }
    }

    #[test]
    fn tampered_replayed_and_foreign_packets_are_refused() {
        let mut rng = StdRng::seed_from_u64(8);
        let ours = SdesKey::generate(&mut rng);
        let phones = SdesKey::generate(&mut rng);
        let mut server = SrtpSession::new(&ours, &phones).expect("valid keys");
        let mut phone = SrtpSession::new(&phones, &ours).expect("valid keys");

        let protected = phone.protect(&packet(10, &[1; 160])).expect("protects");
        for at in [1, 13, protected.len() - 1] {
            let mut tampered = protected.clone();
            tampered[at] ^= 0x01;
            let error = server.unprotect(&tampered).expect_err("tampered");
            assert_eq!(error.category(), "srtp");
        }
        server
            .unprotect(&protected)
            .expect("the original is authentic");
        assert!(server.unprotect(&protected).is_err(), "replay accepted");
        // Our own packet (the wrong key for the inbound direction), and a short one.
        let own = server.protect(&packet(11, &[1; 160])).expect("protects");
        assert!(server.unprotect(&own).is_err());
        assert!(server.unprotect(&protected[..20]).is_err());
        assert!(server.unprotect(&[]).is_err());
    }

    #[test]
    fn inbound_ssrcs_are_bounded() {
        let mut server = SrtpSession::new(&RFC3711_KEY, &RFC3711_KEY).expect("valid keys");
        let mut forged = CIPHERTEXT;
        for ssrc in 0..MAX_INBOUND_SSRCS as u32 {
            forged[8..12].copy_from_slice(&ssrc.to_be_bytes());
            let error = server.unprotect(&forged).expect_err("forged");
            assert!(!error.to_string().contains("SSRCs"), "{error}");
        }
        // The phone's own SSRC now comes one too many.
        let error = server.unprotect(&CIPHERTEXT).expect_err("no room left");
        assert!(error.to_string().contains("SSRCs"), "{error}");
        // Known SSRCs still reach the context.
        let mut fresh = SrtpSession::new(&RFC3711_KEY, &RFC3711_KEY).expect("valid keys");
        fresh.unprotect(&CIPHERTEXT).expect("authentic");
        for _ in 0..2 * MAX_INBOUND_SSRCS {
            let error = fresh.unprotect(&CIPHERTEXT).expect_err("replay");
            assert!(!error.to_string().contains("SSRCs"), "{error}");
        }
    }

    #[test]
    fn rtcp_round_trip() {
        let mut rng = StdRng::seed_from_u64(9);
        let (ours, phones) = (SdesKey::generate(&mut rng), SdesKey::generate(&mut rng));
        let mut server = SrtpSession::new(&ours, &phones).expect("valid keys");
        let mut phone = SrtpSession::new(&phones, &ours).expect("valid keys");
        // An empty receiver report: V=2, RC=0, PT=201, length 1, SSRC.
        let report = [0x80, 201, 0, 1, 0xCA, 0xFE, 0xBA, 0xBE];
        let protected = server.protect_rtcp(&report).expect("protects");
        assert_eq!(phone.unprotect_rtcp(&protected).expect("authentic"), report);
    }

    #[test]
    fn inline_and_attribute_round_trip() {
        let key = SdesKey::generate(&mut StdRng::seed_from_u64(1));
        let inline = key.to_inline();
        assert_eq!(inline.len(), "inline:".len() + 40);
        assert_eq!(SdesKey::from_inline(&inline).expect("valid"), key);
        let attribute = key.to_attribute(1);
        assert!(attribute.starts_with("crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"));
        assert_eq!(
            SdesKey::from_attribute(&attribute).expect("valid"),
            (1, key.clone())
        );
        let with_a = format!("a={attribute}|2^31 WSH=64");
        assert_eq!(
            SdesKey::from_attribute(&with_a).expect("valid"),
            (1, key.clone())
        );
        let bare = format!("7 {CRYPTO_SUITE} {inline}|2147483648");
        assert_eq!(
            SdesKey::from_attribute(&bare).expect("valid"),
            (7, key.clone())
        );
        // Debug does not show the key.
        assert_eq!(format!("{key:?}"), "SdesKey { .. }");
    }

    #[test]
    fn unusable_attributes_are_refused() {
        let inline = RFC3711_KEY.to_inline();
        let cases = [
            (String::new(), "tag"),
            (
                "crypto:x AES_CM_128_HMAC_SHA1_80 inline:AAAA".to_owned(),
                "tag",
            ),
            (
                "crypto:1234567890 AES_CM_128_HMAC_SHA1_80 ".to_owned(),
                "tag",
            ),
            ("crypto:1".to_owned(), "suite"),
            (
                format!("crypto:1 AES_CM_128_HMAC_SHA1_32 {inline}"),
                "suite",
            ),
            (format!("crypto:1 AEAD_AES_128_GCM {inline}"), "suite"),
            (
                "crypto:1 AES_CM_128_HMAC_SHA1_80".to_owned(),
                "key parameter",
            ),
            (
                "crypto:1 AES_CM_128_HMAC_SHA1_80 uri:x".to_owned(),
                "inline",
            ),
            (format!("crypto:1 {CRYPTO_SUITE} inline:AAAA"), "bytes"),
            (format!("crypto:1 {CRYPTO_SUITE} inline:!!!"), "base64"),
            (format!("crypto:1 {CRYPTO_SUITE} {inline}|2^31|1:4"), "MKI"),
            (
                format!("crypto:1 {CRYPTO_SUITE} {inline}|forever"),
                "lifetime",
            ),
            (
                format!("crypto:1 {CRYPTO_SUITE} {inline};{inline}"),
                "several",
            ),
            (
                format!("crypto:1 {CRYPTO_SUITE} {inline} UNENCRYPTED_SRTP"),
                "session",
            ),
            (
                format!("crypto:1 {CRYPTO_SUITE} {inline} KDR=24"),
                "session",
            ),
        ];
        for (text, needle) in cases {
            let error = SdesKey::from_attribute(&text).expect_err("unusable");
            assert_eq!(error.category(), "invalid_crypto");
            let message = error.to_string();
            assert!(message.contains(needle), "{message} for {text}");
            assert!(!message.contains(&inline[7..]), "key material in {message}");
        }
    }
}
