//! The listener fan-out's SRTP seal: `AEAD_AES_128_GCM` (RFC 7714) for one outbound SSRC,
//! in place, with no allocation and no lookup per packet.
//!
//! `rtc::srtp`'s `Context` is correct but built for many streams: each seal looks its SSRC's
//! state up in a map, computes the IV through the generic header type and returns a freshly
//! allocated buffer. A listener has exactly one outbound stream, and the room seals the same
//! frame for thousands of them every 20 ms, so this module does only what that needs:
//! - the session key and salt come from the master key and salt by RFC 3711's AES-CM PRF
//!   (§4.3.3, key derivation rate 0, as RFC 5764 fixes it), with the 96-bit master salt of
//!   RFC 7714 §11; the one AES block operation comes from `rtc::srtp::crypto`;
//! - the IV is RFC 7714 §8.1's: `00 00 || SSRC || ROC || SEQ` XOR the session salt;
//! - the RTP header is the associated data, the payload is encrypted in place and the 16-byte
//!   tag follows it;
//! - the rollover counter advances when the sequence number wraps (RFC 3711 §3.3.1). The
//!   sender's sequence numbers only ever go up by one, so the sender's guess is exact.
//!
//! Written by hand because no crate offers a per-stream, in-place SRTP seal over caller-owned
//! memory; the AES-GCM itself is `rtc`'s provider (ring). The tests check the output against
//! `rtc::srtp`'s own contexts byte for byte.
//!
//! Invariant (nonce uniqueness): one sealer per (key, SSRC), and nothing else seals that SSRC
//! with that key. The listener transport holds the only one for its outbound stream.

use rtc::srtp::crypto::{AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, RTCCrypto};

/// Bytes of the authentication tag after the payload.
pub(crate) const TAG_LEN: usize = 16;
/// Bytes of the AES-128 master key.
pub(crate) const MASTER_KEY_LEN: usize = 16;
/// Bytes of the RFC 7714 master salt.
pub(crate) const MASTER_SALT_LEN: usize = 12;
/// The smallest RTP header: no CSRCs, no extension.
const MIN_HEADER: usize = 12;

/// RFC 3711 §4.3.2's label for the SRTP encryption key.
const LABEL_SRTP_ENCRYPTION: u8 = 0x00;
/// RFC 3711 §4.3.2's label for the SRTP salting key.
const LABEL_SRTP_SALT: u8 = 0x02;

/// Why a sealer could not be built or a packet not sealed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SealError {
    #[error("SRTP master key must be {MASTER_KEY_LEN} bytes and salt {MASTER_SALT_LEN}")]
    KeyLength,
    #[error("SRTP key derivation or cipher setup failed: {0}")]
    Crypto(String),
    #[error("packet of {0} bytes is shorter than its RTP header")]
    Short(usize),
}

/// Seals one outbound SRTP stream with `AEAD_AES_128_GCM`.
pub(crate) struct GcmSealer {
    cipher: Box<dyn AeadCipher>,
    session_salt: [u8; MASTER_SALT_LEN],
    /// The rollover counter and the last sequence number sealed, once one was.
    roc: u32,
    last_sequence: Option<u16>,
}

impl std::fmt::Debug for GcmSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or salt.
        f.debug_struct("GcmSealer")
            .field("roc", &self.roc)
            .field("last_sequence", &self.last_sequence)
            .finish_non_exhaustive()
    }
}

impl GcmSealer {
    /// A sealer keyed from a DTLS-SRTP master key and salt (the exporter's local half).
    pub(crate) fn new(
        crypto: &dyn RTCCrypto,
        master_key: &[u8],
        master_salt: &[u8],
    ) -> Result<Self, SealError> {
        if master_key.len() != MASTER_KEY_LEN || master_salt.len() != MASTER_SALT_LEN {
            return Err(SealError::KeyLength);
        }
        let session_key = prf_block(crypto, LABEL_SRTP_ENCRYPTION, master_key, master_salt)?;
        let salt_block = prf_block(crypto, LABEL_SRTP_SALT, master_key, master_salt)?;
        let mut session_salt = [0u8; MASTER_SALT_LEN];
        session_salt.copy_from_slice(&salt_block[..MASTER_SALT_LEN]);
        let cipher = crypto
            .new_aead(AeadAlgorithm::Aes128Gcm, &session_key)
            .map_err(|e| SealError::Crypto(e.to_string()))?;
        if cipher.tag_len() != TAG_LEN {
            return Err(SealError::Crypto(format!(
                "AES-GCM tag of {} bytes, SRTP needs {TAG_LEN}",
                cipher.tag_len()
            )));
        }
        Ok(GcmSealer {
            cipher,
            session_salt,
            roc: 0,
            last_sequence: None,
        })
    }

    /// Seals the RTP packet in `packet` (a 12-byte header without CSRCs or extension, then
    /// the payload) in place and appends the tag: `packet` grows by [`TAG_LEN`].
    pub(crate) fn seal(&mut self, packet: &mut Vec<u8>, start: usize) -> Result<(), SealError> {
        let len = packet.len() - start;
        if len < MIN_HEADER {
            return Err(SealError::Short(len));
        }
        let rtp = &packet[start..];
        let sequence = u16::from_be_bytes([rtp[2], rtp[3]]);
        let ssrc = [rtp[8], rtp[9], rtp[10], rtp[11]];
        // RFC 3711 §3.3.1: the sender's index advances; a wrap to a smaller number is the
        // next roll-over.
        if let Some(last) = self.last_sequence
            && sequence < last
            && last - sequence > u16::MAX / 2
        {
            self.roc = self.roc.wrapping_add(1);
        }
        self.last_sequence = Some(sequence);
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&ssrc);
        iv[6..10].copy_from_slice(&self.roc.to_be_bytes());
        iv[10..12].copy_from_slice(&sequence.to_be_bytes());
        for (b, s) in iv.iter_mut().zip(self.session_salt) {
            *b ^= s;
        }
        let mut tag = [0u8; TAG_LEN];
        let (header, payload) = packet[start..].split_at_mut(MIN_HEADER);
        self.cipher
            .seal_in_place(&iv, header, payload, &mut tag)
            .map_err(|e| SealError::Crypto(e.to_string()))?;
        packet.extend_from_slice(&tag);
        Ok(())
    }
}

/// One 16-byte block of RFC 3711's AES-CM PRF for `label` at index 0: the master salt
/// (left-aligned in the 14-byte field, RFC 7714 §11) XOR the label at byte 7, a zero block
/// counter, encrypted with the master key. Sixteen bytes cover both the AES-128 session key
/// and the 12-byte session salt.
fn prf_block(
    crypto: &dyn RTCCrypto,
    label: u8,
    master_key: &[u8],
    master_salt: &[u8],
) -> Result<[u8; 16], SealError> {
    let mut block = [0u8; 16];
    block[..master_salt.len()].copy_from_slice(master_salt);
    block[7] ^= label;
    crypto
        .block_encrypt(BlockCipherAlgorithm::Aes128, master_key, &mut block)
        .map_err(|e| SealError::Crypto(e.to_string()))?;
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::srtp::context::Context;
    use rtc::srtp::protection_profile::ProtectionProfile;

    const KEY: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ];
    const SALT: [u8; 12] = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0xaa, 0x55];

    fn crypto() -> std::sync::Arc<dyn rtc::srtp::crypto::RTCCryptoProvider> {
        rtc::srtp::crypto::default_provider().expect("the default provider exists")
    }

    fn rtp(sequence: u16, timestamp: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 111];
        p.extend_from_slice(&sequence.to_be_bytes());
        p.extend_from_slice(&timestamp.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn context(provider: &dyn rtc::srtp::crypto::RTCCryptoProvider) -> Context {
        Context::new(
            &KEY,
            &SALT,
            ProtectionProfile::AeadAes128Gcm,
            None,
            None,
            provider.crypto(),
        )
        .expect("a GCM context from valid lengths")
    }

    #[test]
    fn seals_byte_for_byte_as_rtc_srtp_does_across_a_rollover() {
        let provider = crypto();
        let mut ours = GcmSealer::new(provider.crypto(), &KEY, &SALT).expect("valid key");
        let mut theirs = context(provider.as_ref());
        let mut opener = context(provider.as_ref());
        // Start near the wrap so the rollover counter must advance mid-run.
        let mut sequence: u16 = 65_530;
        for i in 0..12u32 {
            let payload: Vec<u8> = (0..(20 + i as usize)).map(|b| (b as u8) ^ 0x5a).collect();
            let plain = rtp(sequence, 960 * i, 0xdead_beef, &payload);
            let mut sealed = vec![0xff; 3];
            sealed.extend_from_slice(&plain);
            ours.seal(&mut sealed, 3).expect("seal");
            assert_eq!(
                &sealed[..3],
                &[0xff; 3],
                "bytes before the packet untouched"
            );
            let reference = theirs.encrypt_rtp(&plain).expect("rtc-srtp seals");
            assert_eq!(
                &sealed[3..],
                &reference[..],
                "packet {i}, sequence {sequence}"
            );
            let opened = opener
                .decrypt_rtp(&sealed[3..])
                .expect("rtc-srtp opens ours");
            assert_eq!(&opened[..], &plain[..]);
            sequence = sequence.wrapping_add(1);
        }
        assert_eq!(ours.roc, 1, "one wrap seen");
    }

    #[test]
    fn a_different_key_does_not_open_it() {
        let provider = crypto();
        let mut ours = GcmSealer::new(provider.crypto(), &KEY, &SALT).expect("valid key");
        let mut sealed = rtp(7, 0, 1, b"hello opus");
        ours.seal(&mut sealed, 0).expect("seal");
        let mut other_key = KEY;
        other_key[0] ^= 1;
        let mut wrong = Context::new(
            &other_key,
            &SALT,
            ProtectionProfile::AeadAes128Gcm,
            None,
            None,
            provider.crypto(),
        )
        .expect("context");
        assert!(wrong.decrypt_rtp(&sealed).is_err());
    }

    #[test]
    fn refuses_wrong_lengths_and_short_packets() {
        let provider = crypto();
        assert_eq!(
            GcmSealer::new(provider.crypto(), &KEY[..15], &SALT).err(),
            Some(SealError::KeyLength)
        );
        assert_eq!(
            GcmSealer::new(provider.crypto(), &KEY, &[0u8; 14]).err(),
            Some(SealError::KeyLength)
        );
        let mut ours = GcmSealer::new(provider.crypto(), &KEY, &SALT).expect("valid key");
        let mut short = vec![0x80, 111, 0, 1];
        assert_eq!(ours.seal(&mut short, 0), Err(SealError::Short(4)));
        assert_eq!(short.len(), 4, "nothing appended");
    }
}
