//! Transfer codes (DESIGN §12): the secret a device shows as a QR code so that another device can
//! take its session over.
//!
//! Pure: time and randomness come in as arguments, so expiry, single use and revocation are
//! tested in virtual time (property tests below).
//!
//! Invariants:
//! - a code is at least 128 random bits (we use [`CODE_BYTES`] = 144), from the caller's CSPRNG;
//! - only its SHA-256 is stored: the store can tell a code it issued, never show one;
//! - one live code per participant: issuing another revokes the first;
//! - a code is spent at most once; a spent code is remembered (by hash) until it would have
//!   expired, so a second redemption is told "already used, at …" rather than "unknown";
//! - a participant who leaves or moves loses its live code.

use std::collections::HashMap;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::room::core::ParticipantId;

/// Random bytes in a code (144 bits).
pub const CODE_BYTES: usize = 18;
/// Longest code text accepted (the issuer's id, a separator and the random part).
pub const MAX_CODE_LEN: usize = 160;
/// Separates the issuing server's id from the random part (in neither alphabet).
pub const ISSUER_SEPARATOR: char = '~';

/// Who a code moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeTarget {
    /// The room.
    pub room: String,
    /// The participant.
    pub participant: ParticipantId,
    /// Its identity (the fresh join token is for the same one).
    pub identity: String,
}

/// A code as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    target: CodeTarget,
    expires_ms: u64,
    /// When it was spent, if it was.
    spent_ms: Option<u64>,
    /// Revoked (a newer code, or the participant moved).
    revoked: bool,
    /// The participant left.
    left: bool,
}

/// Why a code cannot be redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RedeemError {
    /// Not a code this server issued (or long forgotten, or revoked).
    #[error("unknown transfer code")]
    Unknown,
    /// Past its expiry.
    #[error("the transfer code expired at {expired_ms} ms since the Unix epoch")]
    Expired {
        /// When it expired.
        expired_ms: u64,
    },
    /// Already redeemed.
    #[error("the transfer code was already used at {used_ms} ms since the Unix epoch")]
    Used {
        /// When.
        used_ms: u64,
    },
    /// The participant it moves has left the room.
    #[error("the participant this code moves has left")]
    Gone,
    /// Malformed text.
    #[error("not a transfer code")]
    Malformed,
}

impl RedeemError {
    /// A static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            RedeemError::Unknown => "unknown",
            RedeemError::Expired { .. } => "expired",
            RedeemError::Used { .. } => "used",
            RedeemError::Gone => "gone",
            RedeemError::Malformed => "malformed",
        }
    }
}

/// The codes of one server.
#[derive(Debug, Default)]
pub struct CodeStore {
    by_hash: HashMap<[u8; 32], Entry>,
    live: HashMap<(String, ParticipantId), [u8; 32]>,
}

fn hash(code: &str) -> [u8; 32] {
    Sha256::digest(code.as_bytes()).into()
}

/// The issuing server's id in a code's text, if it names one.
pub fn issuer_of(code: &str) -> Option<&str> {
    code.split_once(ISSUER_SEPARATOR).map(|(issuer, _)| issuer)
}

impl CodeStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Issue a code for `target` from `random`, valid for `ttl_ms` from `now_ms`, naming
    /// `issuer` (this server). Revokes the participant's previous code. Returns the code text and
    /// its expiry.
    pub fn issue(
        &mut self,
        issuer: &str,
        target: CodeTarget,
        random: [u8; CODE_BYTES],
        now_ms: u64,
        ttl_ms: u64,
    ) -> (String, u64) {
        self.purge(now_ms);
        let code = format!(
            "{issuer}{ISSUER_SEPARATOR}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
        );
        let h = hash(&code);
        let key = (target.room.clone(), target.participant);
        if let Some(old) = self.live.insert(key, h)
            && let Some(e) = self.by_hash.get_mut(&old)
        {
            e.revoked = true;
        }
        let expires_ms = now_ms.saturating_add(ttl_ms);
        self.by_hash.insert(
            h,
            Entry {
                target,
                expires_ms,
                spent_ms: None,
                revoked: false,
                left: false,
            },
        );
        (code, expires_ms)
    }

    fn find(&self, code: &str, now_ms: u64) -> Result<([u8; 32], &Entry), RedeemError> {
        if code.is_empty() || code.len() > MAX_CODE_LEN || issuer_of(code).is_none() {
            return Err(RedeemError::Malformed);
        }
        let h = hash(code);
        let entry = self.by_hash.get(&h).ok_or(RedeemError::Unknown)?;
        if let Some(used_ms) = entry.spent_ms {
            return Err(RedeemError::Used { used_ms });
        }
        if entry.left {
            return Err(RedeemError::Gone);
        }
        if entry.revoked {
            return Err(RedeemError::Unknown);
        }
        if now_ms >= entry.expires_ms {
            return Err(RedeemError::Expired {
                expired_ms: entry.expires_ms,
            });
        }
        Ok((h, entry))
    }

    /// Who `code` would move, without spending it (the offer is checked before the code is).
    pub fn check(&self, code: &str, now_ms: u64) -> Result<CodeTarget, RedeemError> {
        self.find(code, now_ms).map(|(_, e)| e.target.clone())
    }

    /// Spend `code`: who it moves. A second call fails with [`RedeemError::Used`].
    pub fn spend(&mut self, code: &str, now_ms: u64) -> Result<CodeTarget, RedeemError> {
        let (h, _) = self.find(code, now_ms)?;
        let entry = self
            .by_hash
            .get_mut(&h)
            .expect("find returned an entry under this hash");
        entry.spent_ms = Some(now_ms);
        let target = entry.target.clone();
        self.live.remove(&(target.room.clone(), target.participant));
        Ok(target)
    }

    /// The participant left: its live code stops working, and says so
    /// ([`RedeemError::Gone`]).
    pub fn revoke(&mut self, room: &str, participant: ParticipantId) {
        if let Some(h) = self.live.remove(&(room.to_owned(), participant))
            && let Some(e) = self.by_hash.get_mut(&h)
        {
            e.left = true;
        }
    }

    /// Forget codes that expired (spent ones are remembered until then, for "already used").
    pub fn purge(&mut self, now_ms: u64) {
        self.by_hash.retain(|_, e| now_ms < e.expires_ms);
        let by_hash = &self.by_hash;
        self.live.retain(|_, h| by_hash.contains_key(h));
    }

    /// Codes held (live, spent or revoked, not yet expired).
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether the store holds no code.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn target(p: ParticipantId) -> CodeTarget {
        CodeTarget {
            room: "lobby".into(),
            participant: p,
            identity: format!("user{p}"),
        }
    }

    #[test]
    fn a_code_is_single_use_expires_and_is_stored_as_a_hash() {
        let mut s = CodeStore::new();
        let (code, exp) = s.issue("s1", target(7), [9; CODE_BYTES], 1_000, 60_000);
        assert_eq!(exp, 61_000);
        assert_eq!(issuer_of(&code), Some("s1"));
        // 144 bits of base64url: 24 characters after the issuer.
        assert_eq!(code.len(), "s1~".len() + 24);
        assert!(!format!("{s:?}").contains(code.split('~').nth(1).unwrap()));
        assert_eq!(s.check(&code, 2_000), Ok(target(7)));
        assert_eq!(s.spend(&code, 3_000), Ok(target(7)));
        assert_eq!(
            s.spend(&code, 4_000),
            Err(RedeemError::Used { used_ms: 3_000 })
        );
        let (late, _) = s.issue("s1", target(8), [1; CODE_BYTES], 1_000, 60_000);
        assert_eq!(
            s.spend(&late, 61_000),
            Err(RedeemError::Expired { expired_ms: 61_000 })
        );
        assert_eq!(s.spend("s1~nothing", 2_000), Err(RedeemError::Unknown));
        assert_eq!(s.spend("no-separator", 2_000), Err(RedeemError::Malformed));
        assert_eq!(
            s.spend(&"x".repeat(MAX_CODE_LEN + 1), 2_000),
            Err(RedeemError::Malformed)
        );
    }

    #[test]
    fn one_live_code_per_participant_and_leaving_revokes_it() {
        let mut s = CodeStore::new();
        let (first, _) = s.issue("s1", target(7), [1; CODE_BYTES], 0, 60_000);
        let (second, _) = s.issue("s1", target(7), [2; CODE_BYTES], 10, 60_000);
        assert_eq!(s.check(&first, 20), Err(RedeemError::Unknown));
        assert_eq!(s.check(&second, 20), Ok(target(7)));
        s.revoke("lobby", 7);
        assert_eq!(s.spend(&second, 30), Err(RedeemError::Gone));
        s.purge(60_011);
        assert!(s.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Issue(u64, u8),
        Spend(usize),
        Revoke(u64),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..4, any::<u8>()).prop_map(|(p, r)| Op::Issue(p, r)),
            (0usize..16).prop_map(Op::Spend),
            (0u64..4).prop_map(Op::Revoke),
            (0u64..40_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a model: a code redeems once at most, only before its expiry, only while it
        /// is its participant's newest code and the participant has not left.
        #[test]
        fn codes_follow_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            let ttl = 30_000;
            let mut s = CodeStore::new();
            let mut now = 0u64;
            // (code, participant, expires, newest?, spent?)
            let mut issued: Vec<(String, u64, u64, bool, bool)> = Vec::new();
            let mut counter = 0u8;
            for op in ops {
                match op {
                    Op::Issue(p, r) => {
                        counter = counter.wrapping_add(1);
                        let mut random = [r; CODE_BYTES];
                        random[0] = counter;
                        random[1] = u8::try_from(issued.len() % 256).unwrap();
                        let (code, exp) = s.issue("s", target(p), random, now, ttl);
                        for c in issued.iter_mut().filter(|c| c.1 == p) {
                            c.3 = false;
                        }
                        issued.push((code, p, exp, true, false));
                    }
                    Op::Spend(i) => {
                        let Some(c) = issued.get_mut(i) else { continue };
                        let got = s.spend(&c.0, now);
                        let ok = !c.4 && c.3 && now < c.2;
                        prop_assert_eq!(got.is_ok(), ok, "{:?} at {}", got, now);
                        if let Ok(t) = got {
                            prop_assert_eq!(t.participant, c.1);
                            c.4 = true;
                            c.3 = false;
                        }
                    }
                    Op::Revoke(p) => {
                        s.revoke("lobby", p);
                        for c in issued.iter_mut().filter(|c| c.1 == p) {
                            c.3 = false;
                        }
                    }
                    Op::Advance(ms) => now += ms,
                }
            }
        }
    }
}
