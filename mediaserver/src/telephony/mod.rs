//! Call me (patent 2, DESIGN §11): a participant asks the conference to call a desk phone; the
//! server asks the PBX's call manager where the phone is registered, calls it, and the phone
//! becomes one more member of the room.
//!
//! Parts:
//! - [`call`]: the pure call state machine (SIP events and timer ticks in, state and actions
//!   out), tested in virtual time;
//! - [`sip`]: the SIP user agent on `rsipstack` (transactions, dialogs, digest auth, CANCEL,
//!   BYE, UDP/TCP/TLS), the routing lookup and the incoming-request loop;
//! - [`media`]: the phone leg's pure media parts, written here because no maintained crate does
//!   them for a SIP leg: SDP offer/answer, plain RTP, G.711, RFC 4733 DTMF, SDES-SRTP keys (on
//!   `rtc`'s SRTP);
//! - [`leg`]: the phone leg's RTP socket and transcoding, and the room [`crate::room::transport::Transport`]
//!   it implements;
//! - [`call_task`]: one call's task, running the state machine against the agent, the leg and
//!   a room side (a local room, or a remote one reached over WebRTC from an edge bridge);
//! - [`calls`]: the server's calls: limits, target checks, and who places each call (this
//!   server, or an edge bridge); the HTTP handlers live in [`crate::api`];
//! - [`edge`]: the edge placement: the bridge (`chorus-mediaserver edge`), which registers with
//!   the call manager as a line inside the enterprise network, takes call jobs over an outbound
//!   connection and joins the room as a WebRTC participant, and the server's side of it.
//!
//! Invariants:
//! - only targets matching `allowedTargets`, in the call manager's own domain, are dialled;
//! - credentials come from the Secret's files and are never logged, put in an event, a metric or
//!   a status; a target number is logged only as a short hash ([`target_hash`]);
//! - the phone joins the room only on 200 OK with usable media, so early media is never mixed.

pub mod call;
pub mod call_task;
pub mod calls;
pub mod edge;
pub mod leg;
pub mod media;
pub mod metrics;
pub mod sip;

use std::path::Path;
use std::time::Duration;

use regex::Regex;
use sha2::{Digest, Sha256};

use self::call::CallTimeouts;
use self::media::PhoneCodec;
use self::sip::{CallManager, LineCredentials};

/// Everything that can go wrong in telephony.
#[derive(Debug, thiserror::Error)]
pub enum TelephonyError {
    /// The conference has no telephony block.
    #[error("telephony is not enabled for this conference")]
    Disabled,
    /// The settings cannot be used.
    #[error("telephony settings: {0}")]
    Config(String),
    /// The credentials could not be read.
    #[error("SIP credentials: {0}")]
    Credentials(String),
    /// A socket could not be opened.
    #[error("socket: {0}")]
    Socket(String),
    /// The SIP stack failed.
    #[error("SIP: {0}")]
    Sip(String),
    /// The target may not be dialled.
    #[error("target refused: {0}")]
    Target(String),
    /// The target is in another domain than the call manager's.
    #[error("target refused: only the call manager's domain may be dialled")]
    ForeignHost,
    /// The participant already has a phone.
    #[error("participant {0} already has a phone call")]
    AlreadyCalling(u64),
    /// The identity has as many calls as allowed.
    #[error("too many calls for this identity (at most {0})")]
    IdentityLimit(usize),
    /// The server has as many calls as allowed.
    #[error("this server has its maximum of {0} calls")]
    ServerLimit(usize),
    /// No such call.
    #[error("no such call")]
    NoSuchCall,
    /// No such participant in the room.
    #[error("participant {0} is not in this room")]
    NoSuchParticipant(u64),
    /// The phone's media was malformed.
    #[error(transparent)]
    Media(#[from] media::PhoneMediaError),
    /// Edge mode, and no edge bridge is connected to this server.
    #[error(
        "no edge bridge is connected to this server: calls are placed from the enterprise network by `chorus-mediaserver edge`, and none is running or reachable"
    )]
    NoEdgeBridge,
    /// An edge bridge's token was refused (the message says why).
    #[error("{0}")]
    EdgeToken(String),
    /// Telephony is not in edge mode, so no edge bridge is taken.
    #[error("this conference's telephony is not in edge mode")]
    NotEdgeMode,
    /// The edge connection to the conference failed.
    #[error("edge connection: {0}")]
    Edge(String),
    /// A report named a bridge connection this server does not have.
    #[error("edge bridge {0} is not connected to this server")]
    NoSuchBridge(u64),
}

impl TelephonyError {
    /// A static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            TelephonyError::Disabled => "telephony_disabled",
            TelephonyError::Config(_) => "config",
            TelephonyError::Credentials(_) => "credentials",
            TelephonyError::Socket(_) => "socket",
            TelephonyError::Sip(_) => "sip",
            TelephonyError::Target(_) => "target_not_allowed",
            TelephonyError::ForeignHost => "foreign_host",
            TelephonyError::AlreadyCalling(_) => "already_calling",
            TelephonyError::IdentityLimit(_) => "identity_limit",
            TelephonyError::ServerLimit(_) => "server_limit",
            TelephonyError::NoSuchCall => "no_such_call",
            TelephonyError::NoSuchParticipant(_) => "no_such_participant",
            TelephonyError::Media(e) => e.category(),
            TelephonyError::NoEdgeBridge => "no_edge_bridge",
            TelephonyError::EdgeToken(_) => "edge_token",
            TelephonyError::NotEdgeMode => "not_edge_mode",
            TelephonyError::Edge(_) => "edge",
            TelephonyError::NoSuchBridge(_) => "no_such_bridge",
        }
    }
}

/// Whether SRTP is used on the phone leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaEncryption {
    /// Plain RTP only.
    Disabled,
    /// SRTP offered when signalling is TLS (SDES keys never travel in clear text); plain RTP
    /// accepted.
    Optional,
    /// SRTP or no call.
    Required,
}

/// The running telephony settings (the plan's `telephony` block plus the line's credentials).
#[derive(Debug, Clone)]
pub struct TelephonySettings {
    /// The call manager.
    pub manager: CallManager,
    /// Who places the calls: the media servers (`Server`) or an edge bridge (`Edge`).
    pub mode: chorus_crds::TelephonyMode,
    /// The line's credentials: those of the side that dials (`None` on a media server in edge
    /// mode, which holds no SIP account).
    pub line: Option<LineCredentials>,
    /// The display name shown on the phone (from the plan's `callerId`, see
    /// [`caller_display_name`]).
    pub caller_id: Option<String>,
    /// Offered codecs, in order of preference.
    pub codecs: Vec<PhoneCodec>,
    /// SRTP policy.
    pub encryption: MediaEncryption,
    /// Ring, media and call-length timeouts.
    pub timeouts: CallTimeouts,
    /// Calls this server places at once.
    pub max_concurrent_calls: usize,
    /// Calls one identity may have at once.
    pub max_calls_per_identity: usize,
    /// Patterns a target's user part must fully match.
    pub allowed_targets: Vec<Regex>,
}

impl TelephonySettings {
    /// The line calls are placed from, or why there is none here.
    pub fn line(&self) -> Result<&LineCredentials, TelephonyError> {
        self.line.as_ref().ok_or_else(|| {
            TelephonyError::Credentials("no SIP line is configured on this side".to_owned())
        })
    }

    /// Whether SRTP is offered on this call manager's transport.
    pub fn offers_srtp(&self) -> bool {
        self.encryption != MediaEncryption::Disabled
            && self.manager.transport == rsipstack::sip::Transport::Tls
    }

    /// The user part to dial for `to` (a number, an extension, `user@host` or `sip:user@host`),
    /// or why it may not be dialled. A host, when given, must be the call manager's.
    pub fn check_target(&self, to: &str) -> Result<String, TelephonyError> {
        let to = to.trim();
        let to = to
            .strip_prefix("sips:")
            .or_else(|| to.strip_prefix("sip:"))
            .or_else(|| to.strip_prefix("tel:"))
            .unwrap_or(to);
        let (user, host) = match to.split_once('@') {
            Some((user, host)) => (user, Some(host)),
            None => (to, None),
        };
        if let Some(host) = host {
            let host = host.split([';', '?', '>']).next().unwrap_or_default();
            let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
            if !bare.eq_ignore_ascii_case(&self.manager.host) {
                return Err(TelephonyError::ForeignHost);
            }
        }
        if user.is_empty() || user.len() > 64 {
            return Err(TelephonyError::Target(
                "the number must have 1 to 64 characters".to_owned(),
            ));
        }
        if !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '*' | '#' | '-' | '.' | '_'))
        {
            return Err(TelephonyError::Target(
                "the number may hold only digits, letters and + * # - . _".to_owned(),
            ));
        }
        if !self.allowed_targets.iter().any(|p| p.is_match(user)) {
            return Err(TelephonyError::Target(
                "the number does not match the conference's allowedTargets".to_owned(),
            ));
        }
        Ok(user.to_owned())
    }
}

impl TelephonySettings {
    /// The settings of a plan's `telephony` block, with the line's credentials (`None` where
    /// this side does not dial: a media server in edge mode).
    pub fn from_plan(
        plan: &chorus_crds::MeshTelephony,
        line: Option<LineCredentials>,
    ) -> Result<Self, TelephonyError> {
        use chorus_crds::{MediaEncryption as Enc, PhoneCodec as Codec, SipTransport};
        let transport = match plan.transport {
            SipTransport::Udp => "udp",
            SipTransport::Tcp => "tcp",
            SipTransport::Tls => "tls",
        };
        let codecs = plan
            .codecs
            .iter()
            .map(|c| match c {
                Codec::Opus => PhoneCodec::Opus,
                Codec::Pcmu => PhoneCodec::Pcmu,
                Codec::Pcma => PhoneCodec::Pcma,
            })
            .collect::<Vec<_>>();
        if codecs.is_empty() {
            return Err(TelephonyError::Config("no codecs".to_owned()));
        }
        Ok(Self {
            mode: plan.mode,
            manager: CallManager::parse(&plan.call_manager_uri, transport)?,
            caller_id: plan.caller_id.as_deref().and_then(caller_display_name),
            codecs,
            encryption: match plan.media_encryption {
                Enc::Disabled => MediaEncryption::Disabled,
                Enc::Optional => MediaEncryption::Optional,
                Enc::Required => MediaEncryption::Required,
            },
            timeouts: CallTimeouts {
                ring: secs(plan.ring_timeout_seconds),
                media: secs(plan.media_timeout_seconds),
                max_call: secs(plan.max_call_seconds),
            },
            max_concurrent_calls: usize::try_from(plan.max_concurrent_calls).unwrap_or(1),
            max_calls_per_identity: usize::try_from(plan.max_calls_per_identity).unwrap_or(1),
            // The plan's own matchers: "matches the whole user part" is defined once, in the CRD
            // crate, for the operator's check and for dialling alike.
            allowed_targets: plan
                .allowed_target_matchers()
                .map_err(|e| TelephonyError::Config(e.to_string()))?,
            line,
        })
    }
}

/// The display name of a `callerId`: the quoted or bare name of `"Chorus" <sip:chorus@pbx>`, or
/// the whole value when it is only a name. The address part is not ours to choose: calls come from
/// the line's own address of record, which the call manager authenticates. `None` when no name
/// remains.
pub fn caller_display_name(caller_id: &str) -> Option<String> {
    let name = match caller_id.split_once('<') {
        Some((name, _)) => name,
        None if caller_id.contains(':') => "",
        None => caller_id,
    };
    let name = name.trim().trim_matches('"').trim();
    // A quote or a control character would break the From header it goes into.
    let name: String = name
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Read the line's credentials from a directory holding `username` and `password` (the
/// telephony Secret mounted as files). Errors name the file, never its content.
pub fn read_credentials(dir: &Path) -> Result<LineCredentials, TelephonyError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|e| TelephonyError::Credentials(format!("{}: {e}", path.display())))
            .and_then(|s| {
                if s.is_empty() {
                    Err(TelephonyError::Credentials(format!(
                        "{} is empty",
                        path.display()
                    )))
                } else {
                    Ok(s)
                }
            })
    };
    Ok(LineCredentials {
        username: read("username")?,
        password: read("password")?,
    })
}

/// A short, stable hash of a phone number for logs: numbers are personal data.
pub fn target_hash(target: &str) -> String {
    let digest = Sha256::digest(target.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds as a `Duration`, for plan fields.
fn secs(n: u32) -> Duration {
    Duration::from_secs(u64::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(patterns: &[&str]) -> chorus_crds::MeshTelephony {
        chorus_crds::MeshTelephony {
            call_manager_uri: "sip:pbx.example.com:5060".into(),
            transport: chorus_crds::SipTransport::Udp,
            caller_id: None,
            codecs: vec![chorus_crds::PhoneCodec::Pcmu],
            mode: chorus_crds::TelephonyMode::Server,
            media_encryption: chorus_crds::MediaEncryption::Optional,
            ring_timeout_seconds: 30,
            media_timeout_seconds: 10,
            max_call_seconds: 3600,
            max_concurrent_calls: 2,
            max_calls_per_identity: 1,
            allowed_targets: patterns.iter().map(|s| s.to_string()).collect(),
            sip_port: 5060,
            credentials_secret: Some("pbx".into()),
        }
    }

    fn settings(patterns: &[&str]) -> TelephonySettings {
        let line = LineCredentials {
            username: "chorus".into(),
            password: "pw".into(),
        };
        let s = TelephonySettings::from_plan(&plan(patterns), Some(line)).unwrap();
        assert_eq!(s.codecs, vec![PhoneCodec::Pcmu]);
        assert_eq!(s.timeouts.ring, secs(30));
        s
    }

    #[test]
    fn targets_must_match_a_pattern_wholly_and_stay_in_the_domain() {
        let s = settings(&["1[0-9]{3}", r"\+49[0-9]+"]);
        assert_eq!(s.check_target("1001").unwrap(), "1001");
        assert_eq!(s.check_target("sip:1001@pbx.example.com").unwrap(), "1001");
        assert_eq!(s.check_target("1001@pbx.example.com:5060").unwrap(), "1001");
        assert_eq!(s.check_target("+4930123").unwrap(), "+4930123");
        // Anchored: a pattern matching a part is not enough.
        assert!(matches!(
            s.check_target("10011"),
            Err(TelephonyError::Target(_))
        ));
        assert!(matches!(
            s.check_target("+19005551234"),
            Err(TelephonyError::Target(_))
        ));
        assert!(matches!(
            s.check_target("1001@evil.example.net"),
            Err(TelephonyError::ForeignHost)
        ));
        assert!(matches!(
            s.check_target("sip:1001@pbx.example.com.evil.net"),
            Err(TelephonyError::ForeignHost)
        ));
        for bad in ["", "10 01", "1001;transport=tcp", "1001>", "a\"b"] {
            assert!(s.check_target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pattern_that_does_not_compile_is_refused_by_name() {
        let line = LineCredentials {
            username: "chorus".into(),
            password: "pw".into(),
        };
        let err = TelephonySettings::from_plan(&plan(&["("]), Some(line)).unwrap_err();
        assert!(err.to_string().contains("allowedTargets"), "{err}");
    }

    #[test]
    fn call_manager_uris_parse_with_default_ports() {
        let m = CallManager::parse("sip:127.0.0.1:5070", "udp").unwrap();
        assert_eq!((m.host.as_str(), m.port), ("127.0.0.1", 5070));
        let m = CallManager::parse("sips:pbx.example.com", "tls").unwrap();
        assert_eq!((m.host.as_str(), m.port), ("pbx.example.com", 5061));
        assert!(CallManager::parse("http://x", "udp").is_err());
        assert!(CallManager::parse("sip:x", "sctp").is_err());
        assert!(CallManager::parse("sip:", "udp").is_err());
    }

    #[test]
    fn credentials_come_from_files_and_never_show_in_debug() {
        let dir = std::env::temp_dir().join(format!("chorus-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("username"), "chorus\n").unwrap();
        std::fs::write(dir.join("password"), "s3cret-value\n").unwrap();
        let line = read_credentials(&dir).unwrap();
        assert_eq!(line.username, "chorus");
        assert_eq!(line.password, "s3cret-value");
        assert!(!format!("{line:?}").contains("s3cret"));
        std::fs::remove_file(dir.join("password")).unwrap();
        let err = read_credentials(&dir).unwrap_err();
        assert!(err.to_string().contains("password"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn caller_ids_become_display_names() {
        assert_eq!(
            caller_display_name("\"Chorus\" <sip:chorus@127.0.0.1>").as_deref(),
            Some("Chorus")
        );
        assert_eq!(
            caller_display_name("Town hall <sip:x@y>").as_deref(),
            Some("Town hall")
        );
        assert_eq!(caller_display_name("Chorus").as_deref(), Some("Chorus"));
        assert_eq!(caller_display_name("sip:chorus@pbx"), None);
        assert_eq!(caller_display_name("<sip:chorus@pbx>"), None);
        // Nothing that could end the header survives.
        assert_eq!(
            caller_display_name("Ev\"il\r\nX-Injected <sip:a@b>").as_deref(),
            Some("EvilX-Injected")
        );
        assert_eq!(caller_display_name("Evil\r\nVia: x"), None);
    }

    #[test]
    fn target_hashes_are_short_and_stable() {
        assert_eq!(target_hash("1001"), target_hash("1001"));
        assert_ne!(target_hash("1001"), target_hash("1002"));
        assert_eq!(target_hash("1001").len(), 8);
    }
}
