//! The operator's one error type.
//!
//! Each variant maps to a static [`Error::category`] used as a metric label, and to a policy:
//! [`Error::is_transient`] errors are retried with backoff; the rest wait for the user to change
//! something. A spec that cannot be satisfied is not an error here at all: it is a status condition
//! (see [`crate::plan::SpecProblem`]).

/// Everything that can go wrong while reconciling a conference.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API {verb} {kind} {name:?}: {source}")]
    Kube {
        /// What we asked (get, apply, delete, ...).
        verb: &'static str,
        /// The object's kind.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// Making or reading certificates or keys failed.
    #[error("secret material: {message}")]
    SecretMaterial {
        /// What went wrong; never contains key material.
        message: String,
    },
    /// The Conference object lacks something the API server always sets.
    #[error("malformed Conference object: {0}")]
    MalformedObject(&'static str),
    /// Reading input for a CLI command failed, or a startup check found the cluster unprepared.
    #[error("{0}")]
    Input(String),
    /// Leader election could not run.
    #[error("leader election: {0}")]
    Leadership(String),
    /// Another replica took the lease while this one was reconciling.
    #[error("lost the leader lease; exiting so a fresh standby can take over")]
    LostLeadership,
}

impl Error {
    /// A static label for metrics (`chorus_operator_reconcile_errors_total{category}`).
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => "conflict",
                kube::Error::Api(s) if s.code == 404 => "not_found",
                kube::Error::Api(s) if s.code == 403 => "forbidden",
                kube::Error::Api(s) if s.code == 422 || s.code == 400 => "invalid",
                kube::Error::Api(s) if s.code >= 500 => "server_error",
                kube::Error::Api(_) => "api",
                _ => "transport",
            },
            Error::SecretMaterial { .. } => "secret_material",
            Error::MalformedObject(_) => "malformed_object",
            Error::Input(_) => "input",
            Error::Leadership(_) | Error::LostLeadership => "leadership",
        }
    }

    /// Whether trying again later may succeed without anybody changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube { source, .. } => match source {
                // Invalid or forbidden requests repeat the same way until someone acts.
                kube::Error::Api(s) => !matches!(s.code, 400 | 403 | 422),
                _ => true,
            },
            Error::Leadership(_) => true,
            Error::SecretMaterial { .. }
            | Error::MalformedObject(_)
            | Error::Input(_)
            | Error::LostLeadership => false,
        }
    }

    pub(crate) fn kube(
        verb: &'static str,
        kind: &'static str,
        name: impl Into<String>,
    ) -> impl FnOnce(kube::Error) -> Error {
        let name = name.into();
        move |source| Error::Kube {
            verb,
            kind,
            name,
            source,
        }
    }
}
