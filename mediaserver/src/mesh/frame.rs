//! The control stream's frame codec: how Hello, Ping, Pong and [`ControlMessage`]s travel over
//! the one bidirectional QUIC stream between two mesh servers.
//!
//! The dialer opens that stream. Each frame is `length (u32 BE) || kind (u8) || body`, `length`
//! counting kind and body, `1..=MAX_FRAME`:
//!
//! | kind | frame   | body |
//! |------|---------|------|
//! | 1    | Hello   | version (u8 = 1) `\|\|` the dialer's server id (UTF-8) |
//! | 2    | Ping    | u64 BE: sender's clock, µs |
//! | 3    | Pong    | u64 BE: the Ping's value, echoed |
//! | 4    | Control | one [`ControlMessage`] as [`ControlMessage::encode`] makes it |
//!
//! Invariants:
//! - the length prefix is checked before any body is read or allocated, so a peer cannot make
//!   the reader allocate more than [`MAX_FRAME`] bytes;
//! - a length over the limit ends the connection (a byte stream cannot be resynchronised after
//!   it); a bad body is only that frame's error, reported to the caller to count and skip;
//! - decoding never panics, whatever the bytes.

use super::error::MeshError;
use super::protocol::ServerId;
use super::wire::{self, ControlMessage, MAX_CONTROL_BYTES};

/// Largest frame body (kind byte plus body).
pub const MAX_FRAME: usize = MAX_CONTROL_BYTES + 1;
/// Version byte in `Hello`.
pub const HELLO_VERSION: u8 = 1;

const KIND_HELLO: u8 = 1;
const KIND_PING: u8 = 2;
const KIND_PONG: u8 = 3;
const KIND_CONTROL: u8 = 4;

/// One frame of the control stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// First frame from the dialer: who it is.
    Hello {
        /// The dialer's server id.
        server_id: ServerId,
    },
    /// RTT probe.
    Ping(u64),
    /// RTT probe answer.
    Pong(u64),
    /// A protocol message.
    Control(ControlMessage),
}

impl Frame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, MeshError> {
        match self {
            Frame::Hello { server_id } => {
                wire::check_server_id(server_id)?;
                let mut b = vec![HELLO_VERSION];
                b.extend_from_slice(server_id.as_bytes());
                with_prefix(KIND_HELLO, &b)
            }
            Frame::Ping(t) => with_prefix(KIND_PING, &t.to_be_bytes()),
            Frame::Pong(t) => with_prefix(KIND_PONG, &t.to_be_bytes()),
            Frame::Control(m) => Self::encode_control(m),
        }
    }

    /// A control frame, without cloning the message into a [`Frame`].
    pub fn encode_control(msg: &ControlMessage) -> Result<Vec<u8>, MeshError> {
        with_prefix(KIND_CONTROL, &msg.encode()?)
    }

    /// The body length announced by a length prefix, checked against `1..=max`.
    pub fn length(prefix: [u8; 4], max: usize) -> Result<usize, MeshError> {
        let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(MeshError::Truncated {
                what: "control frame",
                need: 1,
                got: 0,
            });
        }
        if len > max {
            return Err(MeshError::TooLarge {
                what: "control frame",
                len,
                max,
            });
        }
        Ok(len)
    }

    /// Decode a frame body (kind byte and body, without the length prefix).
    pub fn decode(frame: &[u8]) -> Result<Self, MeshError> {
        if frame.len() > MAX_FRAME {
            return Err(MeshError::TooLarge {
                what: "control frame",
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        let Some((&kind, body)) = frame.split_first() else {
            return Err(MeshError::Truncated {
                what: "control frame",
                need: 1,
                got: 0,
            });
        };
        let u64_body = |what: &'static str| -> Result<u64, MeshError> {
            let b: [u8; 8] = body.try_into().map_err(|_| MeshError::Malformed {
                what,
                detail: format!("body must be 8 bytes, got {}", body.len()),
            })?;
            Ok(u64::from_be_bytes(b))
        };
        match kind {
            KIND_HELLO => {
                let Some((&version, id)) = body.split_first() else {
                    return Err(MeshError::Truncated {
                        what: "hello frame",
                        need: 2,
                        got: body.len(),
                    });
                };
                if version != HELLO_VERSION {
                    return Err(MeshError::UnsupportedVersion {
                        what: "hello frame",
                        version,
                        supported: HELLO_VERSION,
                    });
                }
                let id = std::str::from_utf8(id).map_err(|_| MeshError::Malformed {
                    what: "hello frame",
                    detail: "server id is not UTF-8".into(),
                })?;
                wire::check_server_id(id)?;
                Ok(Frame::Hello {
                    server_id: id.to_owned(),
                })
            }
            KIND_PING => Ok(Frame::Ping(u64_body("ping frame")?)),
            KIND_PONG => Ok(Frame::Pong(u64_body("pong frame")?)),
            KIND_CONTROL => Ok(Frame::Control(ControlMessage::decode(body)?)),
            other => Err(MeshError::Malformed {
                what: "control frame",
                detail: format!("unknown frame kind {other}"),
            }),
        }
    }
}

fn with_prefix(kind: u8, body: &[u8]) -> Result<Vec<u8>, MeshError> {
    let len = body.len() + 1;
    let too_large = || MeshError::TooLarge {
        what: "control frame",
        len,
        max: MAX_FRAME,
    };
    if len > MAX_FRAME {
        return Err(too_large());
    }
    let len32 = u32::try_from(len).map_err(|_| too_large())?;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&len32.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    Ok(out)
}

/// Read one frame: `Err` when the stream is broken or the length is over the limit (the
/// connection must end), `Ok((bytes, Err))` when only the body is bad.
pub(super) async fn read_frame(
    recv: &mut quinn::RecvStream,
) -> Result<(usize, Result<Frame, MeshError>), MeshError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| MeshError::io("control stream read failed", e))?;
    let len = Frame::length(prefix, MAX_FRAME)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| MeshError::io("control stream read failed", e))?;
    Ok((len + 4, Frame::decode(&body)))
}
