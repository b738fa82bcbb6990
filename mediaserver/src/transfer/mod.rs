//! Session transfer by QR code (patent 3, DESIGN §12): a participant's device shows a code;
//! another device, unknown to the system, redeems it with its SDP offer and carries the session
//! on under the same participant: same id, identity, place in the mix, roster entry and mesh
//! stream. Only the transport under the participant is swapped
//! ([`crate::room::Rooms::prepare_transfer`], [`crate::room::Rooms::complete_transfer`]).
//!
//! - [`codes`]: the pure code store (single use, expiry, one live code per participant, hashes
//!   only), property-tested;
//! - [`Transfers`]: the server's codes, the plan's settings, rate limits and the QR code (an SVG
//!   from the `qrcode` crate); the HTTP side is `api/transfer.rs`.
//!
//! Invariants: codes come from a CSPRNG (`rand`'s thread generator: ChaCha, seeded and
//! reseeded from the operating system); a code travels only in a URL
//! fragment and an `Authorization` header, never in a path or a log line.

pub mod codes;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;

use self::codes::{CODE_BYTES, CodeStore, CodeTarget, RedeemError};
use crate::room::core::ParticipantId;

/// Codes one participant may have issued per [`ISSUE_WINDOW`].
pub const ISSUE_LIMIT: usize = 10;
/// The window of [`ISSUE_LIMIT`].
pub const ISSUE_WINDOW: Duration = Duration::from_secs(60);
/// Redemption attempts this server takes per [`REDEEM_WINDOW`] (a 144-bit code cannot be
/// guessed; the limit keeps floods from costing WebRTC negotiations).
pub const REDEEM_LIMIT: usize = 30;
/// The window of [`REDEEM_LIMIT`].
pub const REDEEM_WINDOW: Duration = Duration::from_secs(10);

/// The plan's transfer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferSettings {
    /// Whether participants may move.
    pub enabled: bool,
    /// A code's lifetime.
    pub ttl: Duration,
    /// Whether codes of other servers are forwarded to their issuer.
    pub allow_cross_server: bool,
}

impl Default for TransferSettings {
    fn default() -> Self {
        // The CRD's defaults, so a server alone and a planned one start alike.
        let spec = chorus_crds::TransferSpec::default();
        Self {
            enabled: spec.enabled,
            ttl: Duration::from_secs(u64::try_from(spec.token_ttl_seconds).unwrap_or(60)),
            allow_cross_server: spec.allow_cross_server,
        }
    }
}

impl From<&chorus_crds::MeshTransfer> for TransferSettings {
    fn from(t: &chorus_crds::MeshTransfer) -> Self {
        Self {
            enabled: t.enabled,
            ttl: Duration::from_secs(u64::from(t.token_ttl_seconds)),
            allow_cross_server: t.allow_cross_server,
        }
    }
}

/// A code as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCode {
    /// The code (for the URL fragment only).
    pub code: String,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// Why a transfer request is refused before any code is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Transfer is switched off for this conference.
    #[error("session transfer is disabled for this conference")]
    Disabled,
    /// Too many requests.
    #[error("too many transfer requests; try again in a few seconds")]
    TooMany,
}

/// Fixed-window counters.
#[derive(Debug, Default)]
struct Windows {
    issued: HashMap<(String, ParticipantId), (Instant, usize)>,
    redeemed: Option<(Instant, usize)>,
}

/// The transfer codes of this server.
#[derive(Debug)]
pub struct Transfers {
    server_id: String,
    settings: Mutex<TransferSettings>,
    store: Mutex<CodeStore>,
    windows: Mutex<Windows>,
}

/// Now, in ms since the Unix epoch.
pub fn unix_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("transfer locks are never poisoned: nothing panics while holding them")
}

impl Transfers {
    /// The codes of server `server_id`.
    pub fn new(server_id: &str, settings: TransferSettings) -> Self {
        Self {
            server_id: server_id.to_owned(),
            settings: Mutex::new(settings),
            store: Mutex::new(CodeStore::new()),
            windows: Mutex::new(Windows::default()),
        }
    }

    /// This server's id (the issuer named in its codes).
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// New settings (a new plan generation); codes already issued keep their expiry.
    pub fn set_settings(&self, settings: TransferSettings) {
        *lock(&self.settings) = settings;
    }

    /// The settings in force.
    pub fn settings(&self) -> TransferSettings {
        *lock(&self.settings)
    }

    /// Issue a code for `target`, revoking its previous one.
    pub fn issue(&self, target: CodeTarget, now: SystemTime) -> Result<IssuedCode, LimitError> {
        let settings = self.settings();
        if !settings.enabled {
            return Err(LimitError::Disabled);
        }
        {
            let mut windows = lock(&self.windows);
            let key = (target.room.clone(), target.participant);
            let instant = Instant::now();
            windows
                .issued
                .retain(|_, (start, _)| instant.duration_since(*start) < ISSUE_WINDOW);
            let (_, count) = windows.issued.entry(key).or_insert((instant, 0));
            if *count >= ISSUE_LIMIT {
                return Err(LimitError::TooMany);
            }
            *count += 1;
        }
        let mut random = [0u8; CODE_BYTES];
        rand::rng().fill_bytes(&mut random);
        let ttl = u64::try_from(settings.ttl.as_millis()).unwrap_or(u64::MAX);
        let (code, expires_ms) =
            lock(&self.store).issue(&self.server_id, target, random, unix_ms(now), ttl);
        Ok(IssuedCode { code, expires_ms })
    }

    /// Count one redemption attempt against the server's limit.
    pub fn admit_redemption(&self) -> Result<(), LimitError> {
        if !self.settings().enabled {
            return Err(LimitError::Disabled);
        }
        let mut windows = lock(&self.windows);
        let now = Instant::now();
        let window = match windows.redeemed {
            Some((start, count)) if now.duration_since(start) < REDEEM_WINDOW => (start, count),
            _ => (now, 0),
        };
        if window.1 >= REDEEM_LIMIT {
            return Err(LimitError::TooMany);
        }
        windows.redeemed = Some((window.0, window.1 + 1));
        Ok(())
    }

    /// Who `code` would move, without spending it.
    pub fn check(&self, code: &str, now: SystemTime) -> Result<CodeTarget, RedeemError> {
        lock(&self.store).check(code, unix_ms(now))
    }

    /// Spend `code`.
    pub fn spend(&self, code: &str, now: SystemTime) -> Result<CodeTarget, RedeemError> {
        lock(&self.store).spend(code, unix_ms(now))
    }

    /// The participant left: its live code stops working.
    pub fn revoke(&self, room: &str, participant: ParticipantId) {
        lock(&self.store).revoke(room, participant);
    }
}

/// The QR code of `text` as an inline SVG document.
pub fn qr_svg(text: &str) -> Result<String, qrcode::types::QrError> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)?;
    Ok(code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> CodeTarget {
        CodeTarget {
            room: "lobby".into(),
            participant: 3,
            identity: "ada".into(),
        }
    }

    #[test]
    fn issuing_is_limited_per_participant_and_codes_name_the_server() {
        let t = Transfers::new("s1", TransferSettings::default());
        let now = SystemTime::now();
        let first = t.issue(target(), now).unwrap();
        assert!(first.code.starts_with("s1~"));
        assert_eq!(t.check(&first.code, now).unwrap().participant, 3);
        for _ in 1..ISSUE_LIMIT {
            t.issue(target(), now).unwrap();
        }
        assert_eq!(t.issue(target(), now), Err(LimitError::TooMany));
        // Only the newest code works.
        assert!(t.check(&first.code, now).is_err());
        t.set_settings(TransferSettings {
            enabled: false,
            ..TransferSettings::default()
        });
        assert_eq!(t.admit_redemption(), Err(LimitError::Disabled));
    }

    #[test]
    fn redemptions_are_limited_per_window() {
        let t = Transfers::new("s1", TransferSettings::default());
        for _ in 0..REDEEM_LIMIT {
            t.admit_redemption().unwrap();
        }
        assert_eq!(t.admit_redemption(), Err(LimitError::TooMany));
    }

    #[test]
    fn the_qr_code_is_an_svg() {
        let svg = qr_svg("http://127.0.0.1:8080/t#s1~AAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg}");
    }
}
