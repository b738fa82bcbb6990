//! [`MeshError`]: every failure of the mesh, in one enum.
//!
//! Invariant: each variant maps to one short, static [`MeshError::category`], so callers label
//! metrics (`chorus_mesh_errors_total{category}`) without matching on message strings. Messages
//! name the offending field and limit, never secret material.

/// Why a mesh message, datagram, configuration or connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// Input shorter than its fixed layout needs.
    #[error("mesh {what} truncated: need at least {need} bytes, got {got}")]
    Truncated {
        /// What was being parsed.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// Input or a list inside it is over its limit.
    #[error("mesh {what} too large: {len} exceeds the limit of {max}")]
    TooLarge {
        /// What was over the limit.
        what: &'static str,
        /// Its size or length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version (or magic) byte this build does not speak.
    #[error(
        "mesh {what} has unsupported version {version:#04x} (this build speaks {supported:#04x})"
    )]
    UnsupportedVersion {
        /// What carried the version.
        what: &'static str,
        /// The version found.
        version: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The bytes do not parse (bad JSON, unknown message type, bad UTF-8, unknown frame kind).
    #[error("malformed mesh {what}: {detail}")]
    Malformed {
        /// What was being parsed.
        what: &'static str,
        /// The parser's explanation.
        detail: String,
    },
    /// Parsed, but a field holds a value the protocol forbids.
    #[error("invalid mesh {what}: {detail}")]
    Invalid {
        /// The offending field or message.
        what: &'static str,
        /// Why it is refused.
        detail: String,
    },
    /// A message from, or addressed to, a server that is not in the running plan.
    #[error("mesh peer {0:?} is not in the mesh plan")]
    UnknownPeer(String),
    /// The room limit is reached.
    #[error("mesh room limit of {max} rooms reached")]
    TooManyRooms {
        /// The limit.
        max: usize,
    },
    /// TLS material is missing or unusable, or a peer failed authentication.
    #[error("mesh TLS: {0}")]
    Tls(String),
    /// A socket, file or QUIC operation failed.
    #[error("mesh I/O: {0}")]
    Io(String),
    /// No live connection to that peer right now.
    #[error("mesh peer {0:?} is not connected")]
    NotConnected(String),
    /// The peer's outbound queue is full; the message was dropped.
    #[error("mesh queue to peer {0:?} is full; message dropped")]
    Backpressure(String),
    /// The transport is shut down.
    #[error("mesh transport is shut down")]
    Closed,
}

impl MeshError {
    /// A short, static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            MeshError::Truncated { .. } => "truncated",
            MeshError::TooLarge { .. } => "too_large",
            MeshError::UnsupportedVersion { .. } => "version",
            MeshError::Malformed { .. } => "malformed",
            MeshError::Invalid { .. } => "invalid",
            MeshError::UnknownPeer(_) => "unknown_peer",
            MeshError::TooManyRooms { .. } => "too_many_rooms",
            MeshError::Tls(_) => "tls",
            MeshError::Io(_) => "io",
            MeshError::NotConnected(_) => "not_connected",
            MeshError::Backpressure(_) => "backpressure",
            MeshError::Closed => "closed",
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        MeshError::Invalid {
            what,
            detail: detail.into(),
        }
    }

    /// A TLS failure, `context` saying what was being done.
    pub(crate) fn tls(context: &str, e: impl std::fmt::Display) -> Self {
        MeshError::Tls(format!("{context}: {e}"))
    }

    /// A socket or QUIC failure, `context` saying what was being done.
    pub(crate) fn io(context: &str, e: impl std::fmt::Display) -> Self {
        MeshError::Io(format!("{context}: {e}"))
    }
}
