//! Join tokens and edge tokens: HMAC-SHA256 JWTs minted with the conference's key.
//!
//! A join token names the conference, the room, the participant's identity and an expiry. The
//! server checks all four; every failure is a [`TokenError`] whose message says which check
//! failed, and none of them ever echoes the key or the token back.
//!
//! An edge token ([`EdgeClaims`]) lets one edge bridge take the call jobs of one conference: it
//! names the conference, the bridge and an expiry, and carries `scope: "edge"`. Neither kind
//! passes for the other: a join token has no scope, an edge token has no room.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a join token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The conference the token is for.
    pub conf: String,
    /// The room inside the conference.
    pub room: String,
    /// Who joins: an application-chosen identity, shown to others.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// The transport generation of the device the token was minted for: 0 for a device that
    /// joined, one more per transfer (the token a redeemed code returns). A device's token
    /// cannot act for a participant that moved on.
    #[serde(default, rename = "gen", skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What an edge token grants: taking call jobs of one conference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeClaims {
    /// The conference.
    pub conf: String,
    /// Always [`EDGE_SCOPE`].
    pub scope: String,
    /// The bridge's name (shown in logs and metrics).
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
}

/// The scope claim of an edge token.
pub const EDGE_SCOPE: &str = "edge";

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("missing join token: send `Authorization: Bearer <token>`")]
    Missing,
    /// Not a JWT, or not signed with this conference's key.
    #[error("invalid join token: {0}")]
    Invalid(&'static str),
    /// Past its expiry.
    #[error("join token expired")]
    Expired,
    /// Signed for another conference or room.
    #[error("join token is for {what} {found:?}, not {expected:?}")]
    WrongScope {
        /// "conference" or "room".
        what: &'static str,
        /// What the token says.
        found: String,
        /// What this request needs.
        expected: String,
    },
}

impl TokenError {
    /// A static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::Invalid(_) => "token_invalid",
            TokenError::Expired => "token_expired",
            TokenError::WrongScope { .. } => "token_scope",
        }
    }
}

/// Signs and checks tokens with one key.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("TokenKey(<redacted>)")
    }
}

/// Shortest key accepted, in bytes: HMAC-SHA256 wants at least its output size.
pub const MIN_KEY_BYTES: usize = 32;

impl TokenKey {
    /// A key from its bytes (the operator's Secret holds 32 random bytes as base64 text; the text
    /// itself is used as the key, so the same file works for every tool).
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(TokenError::Invalid("the join key is shorter than 32 bytes"));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        })
    }

    /// Mint a token valid for `ttl` from `now`.
    pub fn mint(
        &self,
        conference: &str,
        room: &str,
        identity: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> String {
        self.mint_for_generation(conference, room, identity, 0, ttl, now)
    }

    /// Mint a token for the device of transport `generation` (see [`Claims::generation`]).
    pub fn mint_for_generation(
        &self,
        conference: &str,
        room: &str,
        identity: &str,
        generation: u64,
        ttl: Duration,
        now: SystemTime,
    ) -> String {
        let iat = unix(now);
        let claims = Claims {
            conf: conference.to_owned(),
            room: room.to_owned(),
            sub: identity.to_owned(),
            exp: iat + ttl.as_secs(),
            iat,
            generation,
        };
        self.sign(&claims)
    }

    /// Check a token for `conference` / `room` at time `now`.
    pub fn verify(
        &self,
        token: &str,
        conference: &str,
        room: &str,
        now: SystemTime,
    ) -> Result<Claims, TokenError> {
        let claims: Claims = self.decode(token)?;
        current_for(claims.exp, &claims.conf, conference, now)?;
        if claims.room != room {
            return Err(TokenError::WrongScope {
                what: "room",
                found: claims.room,
                expected: room.to_owned(),
            });
        }
        Ok(claims)
    }
}

impl TokenKey {
    /// Mint an edge token for bridge `bridge` of `conference`, valid for `ttl` from `now`.
    pub fn mint_edge(
        &self,
        conference: &str,
        bridge: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> String {
        let iat = unix(now);
        let claims = EdgeClaims {
            conf: conference.to_owned(),
            scope: EDGE_SCOPE.to_owned(),
            sub: bridge.to_owned(),
            exp: iat + ttl.as_secs(),
            iat,
        };
        self.sign(&claims)
    }

    /// Check an edge token for `conference` at time `now`.
    pub fn verify_edge(
        &self,
        token: &str,
        conference: &str,
        now: SystemTime,
    ) -> Result<EdgeClaims, TokenError> {
        let claims: EdgeClaims = self.decode(token)?;
        if claims.scope != EDGE_SCOPE {
            return Err(TokenError::Invalid("not an edge token"));
        }
        current_for(claims.exp, &claims.conf, conference, now)?;
        Ok(claims)
    }

    /// Sign `claims`.
    fn sign(&self, claims: &impl Serialize) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail")
    }

    fn decode<C: serde::de::DeserializeOwned>(&self, token: &str) -> Result<C, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked by the callers against their `now`, so tests and the server agree on
        // the clock.
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp".to_owned()].into();
        jsonwebtoken::decode::<C>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                TokenError::Invalid(match e.kind() {
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::InvalidAlgorithm => "wrong algorithm (HS256 expected)",
                    ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                        "not a JWT"
                    }
                    ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => {
                        "claims missing or malformed"
                    }
                    _ => "rejected",
                })
            })
    }
}

/// A token expiring at `exp` and naming conference `found` is current for `conference` at `now`.
fn current_for(exp: u64, found: &str, conference: &str, now: SystemTime) -> Result<(), TokenError> {
    if exp <= unix(now) {
        return Err(TokenError::Expired);
    }
    if found != conference {
        return Err(TokenError::WrongScope {
            what: "conference",
            found: found.to_owned(),
            expected: conference.to_owned(),
        });
    }
    Ok(())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn round_trip_and_every_refusal() {
        let key = TokenKey::new(KEY).unwrap();
        let t = key.mint("town", "lobby", "ada", Duration::from_secs(60), at(1000));
        let c = key.verify(&t, "town", "lobby", at(1030)).unwrap();
        assert_eq!((c.sub.as_str(), c.exp), ("ada", 1060));

        assert_eq!(
            key.verify(&t, "town", "lobby", at(1060)),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            key.verify(&t, "town", "other", at(1030)),
            Err(TokenError::WrongScope { what: "room", .. })
        ));
        assert!(matches!(
            key.verify(&t, "elsewhere", "lobby", at(1030)),
            Err(TokenError::WrongScope {
                what: "conference",
                ..
            })
        ));
        let forged = TokenKey::new(b"another key that is long enough!!").unwrap();
        assert_eq!(
            forged.verify(&t, "town", "lobby", at(1030)),
            Err(TokenError::Invalid("bad signature"))
        );
        assert_eq!(
            key.verify("garbage", "town", "lobby", at(1030)),
            Err(TokenError::Invalid("not a JWT"))
        );
        assert!(TokenKey::new(b"short").is_err());
    }

    #[test]
    fn errors_never_contain_the_key() {
        let key = TokenKey::new(KEY).unwrap();
        let msg = key
            .verify("a.b.c", "town", "lobby", at(0))
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("0123456789abcdef"));
        assert_eq!(format!("{key:?}"), "TokenKey(<redacted>)");
    }

    #[test]
    fn edge_tokens_are_scoped_to_one_conference_and_never_pass_for_join_tokens() {
        let key = TokenKey::new(KEY).unwrap();
        let edge = key.mint_edge("town", "bridge-1", Duration::from_secs(60), at(1000));
        let c = key.verify_edge(&edge, "town", at(1030)).unwrap();
        assert_eq!((c.sub.as_str(), c.scope.as_str()), ("bridge-1", EDGE_SCOPE));
        assert_eq!(
            key.verify_edge(&edge, "town", at(1060)),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            key.verify_edge(&edge, "elsewhere", at(1030)),
            Err(TokenError::WrongScope {
                what: "conference",
                ..
            })
        ));
        // An edge token has no room: it joins nothing.
        assert!(matches!(
            key.verify(&edge, "town", "lobby", at(1030)),
            Err(TokenError::Invalid(_))
        ));
        // A join token has no scope: it takes no call jobs.
        let join = key.mint("town", "lobby", "ada", Duration::from_secs(60), at(1000));
        assert!(matches!(
            key.verify_edge(&join, "town", at(1030)),
            Err(TokenError::Invalid(_))
        ));
        let forged = TokenKey::new(b"another key that is long enough!!").unwrap();
        assert_eq!(
            forged.verify_edge(&edge, "town", at(1030)),
            Err(TokenError::Invalid("bad signature"))
        );
    }
}
