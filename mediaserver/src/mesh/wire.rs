//! Wire formats of the mesh: control messages and media datagrams.
//!
//! Both are network-facing. Every decoder checks the size before it parses, checks every list
//! against its limit and every name against its grammar after, and reports a [`MeshError`]; none
//! panics, whatever the bytes (property-tested in `tests/mesh_wire.rs`).
//!
//! # Control messages
//!
//! One control message is `version (u8 = 1) || JSON`, at most [`MAX_CONTROL_BYTES`] in all. The
//! JSON is an object tagged by `"t"` with short keys (see [`ControlMessage`]). Unknown keys are
//! ignored so a later minor version may add fields; an incompatible change bumps the version byte.
//! JSON was chosen over a custom binary layout because these messages are few (a handful per
//! rank interval per room) and small, and readable captures are worth more than the bytes.
//!
//! # Media datagrams
//!
//! One forwarded RTP audio packet per QUIC datagram, hand-written big-endian layout (there is no
//! crate for our own format, and a fixed layout keeps the per-packet cost to a few loads):
//!
//! ```text
//! offset size field
//!  0     1    magic/version: 0xC1 (high nibble 0xC = Chorus mesh media, low nibble = version 1)
//!  1     1    flags: bit 0 = audio level present, bit 1 = voice activity, bit 2 = backlog (sent
//!             late, from before the stream was forwarded: for its onset); other bits must be 0
//!  2     8    room hash: first 8 bytes of SHA-256("chorus-room\0" || room name), see room_hash
//! 10     8    stream id, local to the sending server (the stream key is (sender, stream id);
//!             the sender is the authenticated QUIC peer, so it is not repeated here)
//! 18     2    RTP sequence number
//! 20     4    RTP timestamp (48 kHz)
//! 24     1    audio level in -dBov, 0..=127 (must be 0 when the level is absent)
//! 25     8    ingress arrival at the origin server, microseconds since the Unix epoch (the shared
//!             epoch of NTP-synchronised servers), for the cross-server delay metric
//! 33     n    the Opus payload exactly as the participant sent it, 1..=1275 bytes
//! ```
//!
//! Invariants: `decode(encode(d)) == d` for every valid datagram and message; limits are the same
//! on the encoding and decoding side, so a valid sender never produces a frame its peers refuse.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::MeshError;
use crate::media::{AudioLevel, Candidate, StreamId};

/// Version byte of control messages.
pub const CONTROL_VERSION: u8 = 1;
/// Largest encoded control message, version byte included.
pub const MAX_CONTROL_BYTES: usize = 128 * 1024;
/// Longest room name (the signalling API's limit).
pub const MAX_ROOM_NAME: usize = 64;
/// Longest server id (a DNS name).
pub const MAX_SERVER_ID: usize = 253;
/// Most rooms in one membership announcement (and so in one server).
pub const MAX_ROOMS_PER_MESSAGE: usize = 1024;
/// Most candidates in one local top list.
pub const MAX_LOCAL_CANDIDATES: usize = 64;
/// Longest global top list (`topSpeakers` is at most 16).
pub const MAX_GLOBAL_LIST: usize = 16;
/// Longest global margin.
pub const MAX_GLOBAL_MARGIN: usize = 48;
/// Longest identity carried with a candidate or a global list (bytes).
pub const MAX_IDENTITY: usize = 256;

/// Magic and version byte of media datagrams.
pub const DATAGRAM_MAGIC: u8 = 0xC1;
/// Fixed header length of a media datagram.
pub const DATAGRAM_HEADER: usize = 33;
/// Largest Opus payload carried (RFC 6716's limit for one frame).
pub const MAX_OPUS_PAYLOAD: usize = 1275;
/// Largest media datagram.
pub const MAX_DATAGRAM: usize = DATAGRAM_HEADER + MAX_OPUS_PAYLOAD;

const FLAG_LEVEL: u8 = 0x01;
const FLAG_VOICE: u8 = 0x02;
const FLAG_BACKLOG: u8 = 0x04;

/// A stream anywhere in the mesh: the server it enters on, and its id there.
///
/// Ordered (server, then stream) so ties break the same way on every server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The origin server's id.
    #[serde(rename = "n")]
    pub server: String,
    /// The stream's id on that server.
    #[serde(rename = "s")]
    pub stream: StreamId,
}

impl StreamKey {
    /// A key from its parts.
    pub fn new(server: impl Into<String>, stream: impl Into<StreamId>) -> Self {
        Self {
            server: server.into(),
            stream: stream.into(),
        }
    }
}

/// The control messages between servers. Every one travels on the peer's control stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "t")]
pub enum ControlMessage {
    /// Liveness. Sent to every peer each heartbeat interval.
    #[serde(rename = "hb")]
    Heartbeat {
        /// Sender's protocol clock, microseconds (informative; clocks are not compared).
        #[serde(rename = "at")]
        sent_at_us: u64,
        /// Changes when the sender restarts, so peers drop what they knew about it.
        #[serde(rename = "inc")]
        incarnation: u64,
        /// The plan generation the sender runs.
        #[serde(rename = "gen")]
        generation: i64,
    },
    /// The full set of rooms the sender has participants in. Sent on change and periodically.
    #[serde(rename = "rm")]
    RoomMembership {
        /// Room names.
        #[serde(rename = "r")]
        rooms: Vec<String>,
    },
    /// The sender's ranked local candidates for one room, to the room's primary.
    #[serde(rename = "lt")]
    LocalTopList {
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// Increases with every list the sender sends for this room (drops reordered lists).
        #[serde(rename = "q")]
        seq: u64,
        /// The epoch of the global list the sender mixes now (0: none). Doubles as an
        /// acknowledgement and tells a new primary which epoch to start above.
        #[serde(rename = "e")]
        epoch: u64,
        /// Voice-active local streams, most important first, each with its speaker's identity
        /// when known (at most [`MAX_IDENTITY`] bytes).
        #[serde(rename = "c")]
        candidates: Vec<Candidate>,
        /// How late the sender switched to `epoch`'s list after the tick it was stamped for, in
        /// µs (0: on time), so the primary counts the ticks it mixed the old list as
        /// inconsistent.
        #[serde(rename = "lu", default, skip_serializing_if = "is_zero")]
        late_us: u64,
    },
    /// The primary's merged list for one room, to every server with participants in it.
    #[serde(rename = "gt")]
    GlobalTopList {
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// Increases with every change and across failovers; a lower epoch never wins.
        #[serde(rename = "e")]
        epoch: u64,
        /// The primary that made the list (must be the sender).
        #[serde(rename = "p")]
        primary: String,
        /// The streams to mix, sorted by key.
        #[serde(rename = "l")]
        list: Vec<StreamKey>,
        /// The next-ranked streams, forwarded but not mixed, sorted by key.
        #[serde(rename = "m")]
        margin: Vec<StreamKey>,
        /// The identity speaking on each stream of `list`, in the same order ("" when unknown);
        /// empty from a sender that names nobody.
        #[serde(rename = "nm", default, skip_serializing_if = "Vec::is_empty")]
        names: Vec<String>,
        /// When every server switches to this list: µs since the Unix epoch, on the primary's
        /// clock, a little ahead of sending (0: at once).
        #[serde(rename = "at", default, skip_serializing_if = "is_zero")]
        at_us: u64,
    },
}

/// For `skip_serializing_if`: a zero field is left out (and read back as its default).
fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl ControlMessage {
    /// A short static name of the message type, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Heartbeat { .. } => "heartbeat",
            ControlMessage::RoomMembership { .. } => "room_membership",
            ControlMessage::LocalTopList { .. } => "local_top_list",
            ControlMessage::GlobalTopList { .. } => "global_top_list",
        }
    }

    /// `version || JSON`. Fails only if the message breaks a limit (so a peer would refuse it).
    pub fn encode(&self) -> Result<Vec<u8>, MeshError> {
        self.validate()?;
        let mut out = Vec::with_capacity(128);
        out.push(CONTROL_VERSION);
        serde_json::to_writer(&mut out, self).map_err(|e| MeshError::Malformed {
            what: "control message",
            detail: e.to_string(),
        })?;
        if out.len() > MAX_CONTROL_BYTES {
            return Err(MeshError::TooLarge {
                what: "control message",
                len: out.len(),
                max: MAX_CONTROL_BYTES,
            });
        }
        Ok(out)
    }

    /// Parse and validate one control message.
    pub fn decode(bytes: &[u8]) -> Result<Self, MeshError> {
        if bytes.len() > MAX_CONTROL_BYTES {
            return Err(MeshError::TooLarge {
                what: "control message",
                len: bytes.len(),
                max: MAX_CONTROL_BYTES,
            });
        }
        let Some((&version, json)) = bytes.split_first() else {
            return Err(MeshError::Truncated {
                what: "control message",
                need: 2,
                got: 0,
            });
        };
        if version != CONTROL_VERSION {
            return Err(MeshError::UnsupportedVersion {
                what: "control message",
                version,
                supported: CONTROL_VERSION,
            });
        }
        let msg: ControlMessage =
            serde_json::from_slice(json).map_err(|e| MeshError::Malformed {
                what: "control message",
                detail: e.to_string(),
            })?;
        msg.validate()?;
        Ok(msg)
    }

    /// Check the limits and grammars a parsed message must meet.
    pub fn validate(&self) -> Result<(), MeshError> {
        match self {
            ControlMessage::Heartbeat { .. } => Ok(()),
            ControlMessage::RoomMembership { rooms } => {
                check_len("room membership rooms", rooms.len(), MAX_ROOMS_PER_MESSAGE)?;
                rooms.iter().try_for_each(|r| check_room(r))
            }
            ControlMessage::LocalTopList {
                room, candidates, ..
            } => {
                check_room(room)?;
                check_len(
                    "local top list candidates",
                    candidates.len(),
                    MAX_LOCAL_CANDIDATES,
                )?;
                for c in candidates {
                    if !c.importance.is_finite() {
                        return Err(MeshError::invalid(
                            "candidate importance",
                            "importance must be a finite number",
                        ));
                    }
                    if let Some(identity) = &c.identity {
                        check_len("candidate identity", identity.len(), MAX_IDENTITY)?;
                    }
                }
                Ok(())
            }
            ControlMessage::GlobalTopList {
                room,
                primary,
                list,
                margin,
                names,
                ..
            } => {
                check_room(room)?;
                check_server_id(primary)?;
                check_len("global top list", list.len(), MAX_GLOBAL_LIST)?;
                check_len("global margin", margin.len(), MAX_GLOBAL_MARGIN)?;
                if !names.is_empty() && names.len() != list.len() {
                    return Err(MeshError::invalid(
                        "global top list names",
                        format!("{} names for {} listed streams", names.len(), list.len()),
                    ));
                }
                for name in names {
                    check_len("global top list name", name.len(), MAX_IDENTITY)?;
                }
                list.iter()
                    .chain(margin)
                    .try_for_each(|k| check_server_id(&k.server))
            }
        }
    }
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), MeshError> {
    if len > max {
        return Err(MeshError::TooLarge { what, len, max });
    }
    Ok(())
}

/// Whether `room` is a valid room name: 1..=64 ASCII letters, digits, `-` or `_` (the signalling
/// API's grammar).
pub fn is_valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_NAME
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// [`is_valid_room`] as a `Result`.
pub fn check_room(room: &str) -> Result<(), MeshError> {
    if is_valid_room(room) {
        Ok(())
    } else {
        Err(MeshError::invalid(
            "room name",
            format!(
                "room names are 1..={MAX_ROOM_NAME} of [A-Za-z0-9_-]; got {} bytes",
                room.len()
            ),
        ))
    }
}

/// Whether `id` is a valid server id: 1..=253 ASCII letters, digits, `-`, `.` or `_`.
pub fn is_valid_server_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SERVER_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// [`is_valid_server_id`] as a `Result`.
pub fn check_server_id(id: &str) -> Result<(), MeshError> {
    if is_valid_server_id(id) {
        Ok(())
    } else {
        Err(MeshError::invalid(
            "server id",
            format!(
                "server ids are 1..={MAX_SERVER_ID} of [A-Za-z0-9._-]; got {} bytes",
                id.len()
            ),
        ))
    }
}

/// The 64-bit room hash carried in media datagrams: the first 8 bytes (big-endian) of
/// SHA-256(`"chorus-room\0"` || room name).
pub fn room_hash(room: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"chorus-room\0");
    h.update(room.as_bytes());
    first_u64(&h.finalize())
}

pub(crate) fn first_u64(digest: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

/// One forwarded RTP audio packet (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaDatagram {
    /// [`room_hash`] of the room.
    pub room_hash: u64,
    /// The stream's id on the sending server.
    pub stream: StreamId,
    /// RTP sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub rtp_timestamp: u32,
    /// Audio level, when known.
    pub level: Option<AudioLevel>,
    /// Ingress arrival at the origin server, µs since the Unix epoch.
    pub ingress_us: u64,
    /// The Opus payload, untouched.
    pub payload: Bytes,
    /// Sent late, from the origin's recent packets, when the stream began to be forwarded: the
    /// receiver keeps it for the stream's onset instead of playing it as live.
    pub backlog: bool,
}

impl MediaDatagram {
    /// Encode. Fails if the payload is empty or over [`MAX_OPUS_PAYLOAD`], or the level is over
    /// 127.
    pub fn encode(&self) -> Result<Bytes, MeshError> {
        if self.payload.is_empty() {
            return Err(MeshError::invalid("datagram payload", "empty Opus payload"));
        }
        check_len("datagram payload", self.payload.len(), MAX_OPUS_PAYLOAD)?;
        let mut flags = 0u8;
        let mut dbov = 0u8;
        if let Some(level) = self.level {
            if level.dbov > 127 {
                return Err(MeshError::invalid(
                    "datagram level",
                    format!("level {} is over 127 -dBov", level.dbov),
                ));
            }
            flags |= FLAG_LEVEL;
            if level.voice {
                flags |= FLAG_VOICE;
            }
            dbov = level.dbov;
        }
        if self.backlog {
            flags |= FLAG_BACKLOG;
        }
        let mut out = BytesMut::with_capacity(DATAGRAM_HEADER + self.payload.len());
        out.put_u8(DATAGRAM_MAGIC);
        out.put_u8(flags);
        out.put_u64(self.room_hash);
        out.put_u64(self.stream.0);
        out.put_u16(self.seq);
        out.put_u32(self.rtp_timestamp);
        out.put_u8(dbov);
        out.put_u64(self.ingress_us);
        out.put_slice(&self.payload);
        Ok(out.freeze())
    }

    /// Decode one datagram. The payload shares `data`'s buffer (no copy).
    pub fn decode(data: Bytes) -> Result<Self, MeshError> {
        if data.len() > MAX_DATAGRAM {
            return Err(MeshError::TooLarge {
                what: "media datagram",
                len: data.len(),
                max: MAX_DATAGRAM,
            });
        }
        if data.len() <= DATAGRAM_HEADER {
            return Err(MeshError::Truncated {
                what: "media datagram",
                need: DATAGRAM_HEADER + 1,
                got: data.len(),
            });
        }
        let h = &data[..DATAGRAM_HEADER];
        if h[0] != DATAGRAM_MAGIC {
            return Err(MeshError::UnsupportedVersion {
                what: "media datagram",
                version: h[0],
                supported: DATAGRAM_MAGIC,
            });
        }
        let flags = h[1];
        if flags & !(FLAG_LEVEL | FLAG_VOICE | FLAG_BACKLOG) != 0 {
            return Err(MeshError::invalid(
                "datagram flags",
                format!("unknown flag bits in {flags:#04x}"),
            ));
        }
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let dbov = h[24];
        let level = if flags & FLAG_LEVEL != 0 {
            if dbov > 127 {
                return Err(MeshError::invalid(
                    "datagram level",
                    format!("level {dbov} is over 127 -dBov"),
                ));
            }
            Some(AudioLevel {
                dbov,
                voice: flags & FLAG_VOICE != 0,
            })
        } else {
            if flags & FLAG_VOICE != 0 || dbov != 0 {
                return Err(MeshError::invalid(
                    "datagram level",
                    "voice flag or level byte set without the level flag",
                ));
            }
            None
        };
        Ok(Self {
            room_hash: be64(2),
            stream: StreamId(be64(10)),
            seq: u16::from_be_bytes([h[18], h[19]]),
            rtp_timestamp: u32::from_be_bytes([h[20], h[21], h[22], h[23]]),
            level,
            ingress_us: be64(25),
            payload: data.slice(DATAGRAM_HEADER..),
            backlog: flags & FLAG_BACKLOG != 0,
        })
    }
}

/// Microseconds since the Unix epoch on this host's wall clock (0 if the clock is before 1970).
/// The shell stamps ingress times with it; the cross-server delay compares two such stamps.
pub fn unix_micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The cross-server delay of a datagram stamped `ingress_us` and received at `now_us` (both µs
/// since the Unix epoch). `None` when clock skew makes it negative.
pub fn cross_server_delay(ingress_us: u64, now_us: u64) -> Option<std::time::Duration> {
    now_us
        .checked_sub(ingress_us)
        .map(std::time::Duration::from_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_datagram_layout_is_as_documented() {
        let d = MediaDatagram {
            room_hash: 0x0102_0304_0506_0708,
            stream: StreamId(9),
            seq: 0xABCD,
            rtp_timestamp: 0x1122_3344,
            level: Some(AudioLevel {
                dbov: 30,
                voice: true,
            }),
            ingress_us: 42,
            payload: Bytes::from_static(b"\xf8opus"),
            backlog: false,
        };
        let b = d.encode().unwrap();
        assert_eq!(b[0], 0xC1);
        assert_eq!(b[1], 0x03);
        assert_eq!(&b[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[10..18], &9u64.to_be_bytes());
        assert_eq!(&b[18..20], &[0xAB, 0xCD]);
        assert_eq!(b[24], 30);
        assert_eq!(&b[33..], b"\xf8opus");
        assert_eq!(MediaDatagram::decode(b).unwrap(), d);
        let late = MediaDatagram { backlog: true, ..d };
        let b = late.encode().unwrap();
        assert_eq!(b[1], 0x07, "the backlog flag is bit 2");
        assert_eq!(MediaDatagram::decode(b).unwrap(), late);
    }

    #[test]
    fn mesh_control_message_is_versioned_json() {
        let m = ControlMessage::RoomMembership {
            rooms: vec!["a".into()],
        };
        let b = m.encode().unwrap();
        assert_eq!(b[0], CONTROL_VERSION);
        assert_eq!(&b[1..], br#"{"t":"rm","r":["a"]}"#);
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(
            ControlMessage::decode(&v2).unwrap_err().category(),
            "version"
        );
        assert_eq!(ControlMessage::decode(&b).unwrap(), m);
    }

    #[test]
    fn mesh_top_list_json_is_unchanged() {
        let local = ControlMessage::LocalTopList {
            room: "lobby".into(),
            seq: 3,
            epoch: 2,
            candidates: vec![
                Candidate {
                    stream: StreamId(7),
                    importance: -12.5,
                    voice: true,
                    identity: Some("alice".into()),
                },
                Candidate {
                    stream: StreamId(9),
                    importance: -40.0,
                    voice: false,
                    identity: None,
                },
            ],
            late_us: 0,
        };
        let b = local.encode().unwrap();
        assert_eq!(
            &b[1..],
            br#"{"t":"lt","r":"lobby","q":3,"e":2,"c":[{"s":7,"i":-12.5,"v":true,"n":"alice"},{"s":9,"i":-40.0,"v":false}]}"#
        );
        assert_eq!(ControlMessage::decode(&b).unwrap(), local);
        let global = ControlMessage::GlobalTopList {
            room: "lobby".into(),
            epoch: 5,
            primary: "a".into(),
            list: vec![StreamKey::new("a", 7), StreamKey::new("b", 9)],
            margin: vec![StreamKey::new("c", 1)],
            names: vec!["alice".into(), String::new()],
            at_us: 0,
        };
        let b = global.encode().unwrap();
        assert_eq!(
            &b[1..],
            br#"{"t":"gt","r":"lobby","e":5,"p":"a","l":[{"n":"a","s":7},{"n":"b","s":9}],"m":[{"n":"c","s":1}],"nm":["alice",""]}"#
        );
        assert_eq!(ControlMessage::decode(&b).unwrap(), global);
        // The switch tick and a late acknowledgement, when set.
        let mut stamped = global;
        if let ControlMessage::GlobalTopList { at_us, .. } = &mut stamped {
            *at_us = 1_700_000_000_123_456;
        }
        let b = stamped.encode().unwrap();
        assert!(b.ends_with(br#","at":1700000000123456}"#));
        assert_eq!(ControlMessage::decode(&b).unwrap(), stamped);
        let late = ControlMessage::LocalTopList {
            room: "lobby".into(),
            seq: 4,
            epoch: 5,
            candidates: Vec::new(),
            late_us: 2500,
        };
        let b = late.encode().unwrap();
        assert_eq!(
            &b[1..],
            br#"{"t":"lt","r":"lobby","q":4,"e":5,"c":[],"lu":2500}"#
        );
        assert_eq!(ControlMessage::decode(&b).unwrap(), late);
    }

    #[test]
    fn mesh_room_hash_is_stable() {
        assert_eq!(room_hash("lobby"), room_hash("lobby"));
        assert_ne!(room_hash("lobby"), room_hash("lobby2"));
    }
}
