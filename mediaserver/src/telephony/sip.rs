//! The SIP user agent of the phone leg, on the `rsipstack` crate: one endpoint per server, a
//! dialog layer, the routing lookup and outgoing calls.
//!
//! What `rsipstack` does for us: transactions and their timers, dialogs, digest authentication
//! (the 401/407 answered with the line's credentials), CANCEL and BYE, and UDP/TCP/TLS
//! connections (TCP and TLS dialled on first use). What stays here is the glue:
//! - [`SipAgent::query_bindings`]: the routing lookup, a REGISTER without Contact for the target's
//!   address of record (RFC 3261 §10.2.3), whose 200 OK lists where the phone is registered.
//!   `rsipstack`'s `Registration` always adds a Contact (it registers), so the query is built
//!   here from the endpoint's public request and transaction API;
//! - [`SipAgent::invite`]: one outgoing call, whose dialog states and final response arrive as
//!   [`SipEvent`]s on a channel, so the call's task can `select!` over them;
//! - the incoming-request loop: in-dialog requests (a phone's BYE) go to their dialog; we never
//!   accept calls, so a new INVITE is refused with 403, and OPTIONS gets 200;
//! - [`SipAgent::keep_registered`]: an edge bridge's line registration, on `rsipstack`'s own
//!   `Registration::keep_alive` (refresh at 75 % of the granted expiry, backoff on failure), so a
//!   call manager that restarted and forgot its bindings has the line back within one refresh.
//!
//! Invariants: no credential appears in a log line or an error message; a URI we dial is built
//! from the call manager's host only (never from user input beyond the checked user part).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rsipstack::EndpointBuilder;
use rsipstack::dialog::DialogId;
use rsipstack::dialog::authenticate::{AuthRetry, Credential, handle_client_authenticate};
use rsipstack::dialog::dialog::{Dialog, DialogState, TerminatedReason};
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invitation::InviteOption;
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::sip::{
    HeadersExt, HostWithPort, Method, StatusCode, Transport as SipTransportKind, Uri,
};
use rsipstack::transaction::Endpoint;
use rsipstack::transaction::TransactionReceiver;
use rsipstack::transaction::key::{TransactionKey, TransactionRole};
use rsipstack::transaction::transaction::Transaction;
use rsipstack::transport::udp::UdpConnection;
use rsipstack::transport::{SipAddr, TlsConfig, TransportLayer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::TelephonyError;

/// How the call manager is reached.
#[derive(Debug, Clone)]
pub struct CallManager {
    /// Its host (a name or an address).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The transport.
    pub transport: SipTransportKind,
}

impl CallManager {
    /// Parse `sip:host[:port]` or `sips:host[:port]` with the plan's transport.
    pub fn parse(uri: &str, transport: &str) -> Result<Self, TelephonyError> {
        let transport = match transport {
            "udp" => SipTransportKind::Udp,
            "tcp" => SipTransportKind::Tcp,
            "tls" => SipTransportKind::Tls,
            other => {
                return Err(TelephonyError::Config(format!(
                    "unknown SIP transport {other:?} (udp, tcp or tls)"
                )));
            }
        };
        let rest = uri
            .strip_prefix("sips:")
            .or_else(|| uri.strip_prefix("sip:"))
            .ok_or_else(|| {
                TelephonyError::Config(format!("call manager URI {uri:?} is not sip: or sips:"))
            })?;
        let rest = rest.split(';').next().unwrap_or_default();
        let default_port = if transport == SipTransportKind::Tls {
            5061
        } else {
            5060
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => (
                host.to_owned(),
                port.parse::<u16>().map_err(|_| {
                    TelephonyError::Config(format!("call manager URI {uri:?} has a bad port"))
                })?,
            ),
            _ => (rest.to_owned(), default_port),
        };
        if host.is_empty() || host.contains(['@', ' ', '/']) {
            return Err(TelephonyError::Config(format!(
                "call manager URI {uri:?} has no usable host"
            )));
        }
        Ok(Self {
            host,
            port,
            transport,
        })
    }

    fn destination(&self) -> Result<SipAddr, TelephonyError> {
        let hp = HostWithPort::try_from(format!("{}:{}", self.host, self.port).as_str())
            .map_err(|e| TelephonyError::Config(format!("call manager address: {e}")))?;
        Ok(SipAddr::new(self.transport, hp))
    }

    /// `sip:user@host` in the call manager's domain.
    pub fn aor(&self, user: &str) -> Result<Uri, TelephonyError> {
        Uri::try_from(format!("sip:{user}@{}", self.host).as_str())
            .map_err(|e| TelephonyError::Config(format!("address of record: {e}")))
    }

    fn registrar(&self) -> Result<Uri, TelephonyError> {
        Uri::try_from(format!("sip:{}:{}", self.host, self.port).as_str())
            .map_err(|e| TelephonyError::Config(format!("registrar URI: {e}")))
    }
}

/// A line's credentials, from the telephony Secret. `Debug` never shows the password.
#[derive(Clone)]
pub struct LineCredentials {
    /// The account (the user part of our address of record).
    pub username: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for LineCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl LineCredentials {
    fn credential(&self) -> Credential {
        Credential {
            username: self.username.clone(),
            password: self.password.clone(),
            realm: None,
            auth_username: None,
        }
    }
}

/// What the routing lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// The call manager listed these bindings; the first is dialled.
    Bindings(Vec<String>),
    /// The line may not query (or the query failed with this status): dial the address of
    /// record through the proxy, whose location lookup routes it.
    ProxyLookup(Option<u16>),
}

/// What happened to an outgoing call, in order.
pub enum SipEvent {
    /// The INVITE went out; the dialog can be cancelled by this id.
    Calling(DialogId),
    /// A provisional response.
    Provisional(u16),
    /// The final response to the INVITE: the status, the SDP body of a 2xx, and the dialog to
    /// end later with BYE.
    Final {
        /// The status code.
        status: u16,
        /// The answer's body (empty for non-2xx).
        body: Vec<u8>,
        /// The confirmed dialog (for BYE).
        dialog: Option<InviteDialog>,
    },
    /// The phone ended the dialog (BYE).
    RemoteBye,
    /// Signalling failed without a final response.
    Failed(String),
}

impl std::fmt::Debug for SipEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SipEvent::Calling(id) => write!(f, "Calling({id})"),
            SipEvent::Provisional(s) => write!(f, "Provisional({s})"),
            SipEvent::Final { status, .. } => write!(f, "Final({status})"),
            SipEvent::RemoteBye => write!(f, "RemoteBye"),
            SipEvent::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

/// One server's SIP user agent.
#[derive(Clone)]
pub struct SipAgent {
    endpoint: Arc<Endpoint>,
    dialogs: Arc<DialogLayer>,
    /// The address our Contact and SDP carry.
    public: IpAddr,
    /// The UDP port we listen on (our Contact's port for UDP).
    local: SocketAddr,
}

impl std::fmt::Debug for SipAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SipAgent")
            .field("public", &self.public)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl SipAgent {
    /// Start the agent on the bound UDP socket `socket` (TCP and TLS connections are dialled as
    /// needed), until `shutdown`. Our Via and Contact carry `public` with the socket's port.
    /// `ca_pem` verifies a TLS call manager's certificate.
    pub async fn start(
        socket: tokio::net::UdpSocket,
        public: IpAddr,
        ca_pem: Option<Vec<u8>>,
        shutdown: CancellationToken,
    ) -> Result<Self, TelephonyError> {
        let transport = TransportLayer::new(shutdown.child_token());
        let bound = socket
            .local_addr()
            .map_err(|e| TelephonyError::Socket(format!("SIP UDP address: {e}")))?;
        let local = SocketAddr::new(public, bound.port());
        let udp =
            UdpConnection::from_socket(Arc::new(socket), Some(local), Some(shutdown.child_token()))
                .await
                .map_err(|e| TelephonyError::Socket(format!("SIP UDP socket {bound}: {e}")))?;
        transport.add_transport(udp.into());
        if let Some(ca) = ca_pem {
            transport.set_tls_config(TlsConfig {
                ca_certs: Some(ca),
                ..TlsConfig::default()
            });
        }
        let endpoint = EndpointBuilder::new()
            .with_transport_layer(transport)
            .with_cancel_token(shutdown.child_token())
            .with_user_agent(concat!("chorus/", env!("CARGO_PKG_VERSION")))
            .build();
        let incoming = endpoint
            .incoming_transactions()
            .map_err(|e| TelephonyError::Sip(format!("SIP endpoint: {e}")))?;
        let inner = endpoint.inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.serve().await {
                tracing::warn!(error = %e, "SIP endpoint stopped");
            }
        });
        let dialogs = Arc::new(DialogLayer::new(endpoint.inner.clone()));
        tokio::spawn(serve_incoming(incoming, dialogs.clone(), shutdown));
        Ok(Self {
            endpoint: Arc::new(endpoint),
            dialogs,
            public,
            local,
        })
    }

    /// The UDP address the agent listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address put in SDP and Contact.
    pub fn public_ip(&self) -> IpAddr {
        self.public
    }

    /// Ask the call manager where `user` is registered: REGISTER for `user`'s address of record
    /// without a Contact, authenticated with `line`.
    pub async fn query_bindings(
        &self,
        manager: &CallManager,
        user: &str,
        line: &LineCredentials,
    ) -> Result<Routing, TelephonyError> {
        let inner = &self.endpoint.inner;
        let target = manager.destination()?;
        let via = match inner.transport_layer.lookup(&target, None).await {
            Ok((connection, _)) => inner.get_via(Some(connection.get_addr().clone()), None),
            Err(_) => inner.get_via(None, None),
        }
        .map_err(|e| TelephonyError::Sip(format!("Via: {e}")))?;
        let aor = manager.aor(user)?;
        let from = rsipstack::sip::typed::From {
            display_name: None,
            uri: manager.aor(&line.username)?,
            params: vec![],
        }
        .with_tag(rsipstack::transaction::make_tag());
        let to = rsipstack::sip::typed::To {
            display_name: None,
            uri: aor,
            params: vec![],
        };
        let request = inner.make_request(
            Method::Register,
            manager.registrar()?,
            via,
            from,
            to,
            1,
            None,
        );
        let key = TransactionKey::from_request(&request, TransactionRole::Client)
            .map_err(|e| TelephonyError::Sip(format!("REGISTER key: {e}")))?;
        let mut tx = Transaction::new_client(key, request, inner.clone(), None);
        tx.destination = Some(target);
        tx.send()
            .await
            .map_err(|e| TelephonyError::Sip(format!("REGISTER query: {e}")))?;
        let mut auth = AuthRetry::new();
        let mut seq = 1;
        let credential = line.credential();
        while let Some(message) = tx.receive().await {
            let rsipstack::sip::SipMessage::Response(response) = message else {
                continue;
            };
            let code = response.status_code.code();
            match code {
                100..=199 => continue,
                401 | 407 if auth.should_answer(&response) => {
                    seq += 1;
                    tx = handle_client_authenticate(seq, &tx, response, &credential)
                        .await
                        .map_err(|e| TelephonyError::Sip(format!("REGISTER auth: {e}")))?;
                    tx.send()
                        .await
                        .map_err(|e| TelephonyError::Sip(format!("REGISTER query: {e}")))?;
                }
                200..=299 => {
                    let contacts = response
                        .typed_contact_headers()
                        .map_err(|e| TelephonyError::Sip(format!("bindings: {e}")))?
                        .into_iter()
                        .map(|c| c.uri.to_string())
                        .collect();
                    return Ok(Routing::Bindings(contacts));
                }
                other => return Ok(Routing::ProxyLookup(Some(other))),
            }
        }
        Ok(Routing::ProxyLookup(None))
    }

    /// Place a call to `request_uri`: the address of record through the call manager (whose
    /// location lookup routes it), or, when `direct`, a binding the routing lookup returned,
    /// sent straight to the address it names. Events arrive on the returned channel; the last
    /// one is a [`SipEvent::Final`] or [`SipEvent::Failed`], possibly followed by
    /// [`SipEvent::RemoteBye`] for an answered call.
    pub fn invite(
        &self,
        manager: &CallManager,
        line: &LineCredentials,
        caller_display: Option<String>,
        request_uri: Uri,
        direct: bool,
        sdp_offer: String,
    ) -> Result<mpsc::UnboundedReceiver<SipEvent>, TelephonyError> {
        let destination = if direct {
            SipAddr::try_from(&request_uri)
                .map_err(|e| TelephonyError::Sip(format!("binding address: {e}")))?
        } else {
            manager.destination()?
        };
        let contact_host = match manager.transport {
            SipTransportKind::Udp => format!("{}:{}", self.public, self.local.port()),
            // On TCP and TLS, rsipstack puts the connection's local address in the Contact.
            _ => self.public.to_string(),
        };
        let option = InviteOption {
            caller_display_name: caller_display,
            caller: manager.aor(&line.username)?,
            callee: request_uri,
            destination: Some(destination),
            content_type: Some("application/sdp".to_owned()),
            offer: Some(sdp_offer.into_bytes()),
            contact: Uri::try_from(format!("sip:{}@{contact_host}", line.username).as_str())
                .map_err(|e| TelephonyError::Config(format!("Contact: {e}")))?,
            credential: Some(line.credential()),
            ..InviteOption::default()
        };
        let (events, events_rx) = mpsc::unbounded_channel();
        let (state_tx, mut state_rx) = self.dialogs.new_dialog_state_channel();
        let dialogs = self.dialogs.clone();
        let forward = events.clone();
        tokio::spawn(async move {
            while let Some(state) = state_rx.recv().await {
                let event = match state {
                    DialogState::Calling(id) => SipEvent::Calling(id),
                    DialogState::Early(_, response) => {
                        SipEvent::Provisional(response.status_code.code())
                    }
                    DialogState::Terminated(id, reason) => {
                        dialogs.remove_dialog(&id);
                        match reason {
                            TerminatedReason::UasBye => SipEvent::RemoteBye,
                            _ => continue,
                        }
                    }
                    _ => continue,
                };
                if forward.send(event).is_err() {
                    break;
                }
            }
        });
        let dialogs = self.dialogs.clone();
        tokio::spawn(async move {
            let event = match dialogs.do_invite(option, state_tx).await {
                Ok((dialog, Some(response))) => {
                    let status = response.status_code.code();
                    let answered = (200..300).contains(&status);
                    if !answered {
                        dialogs.remove_dialog(&dialog.id());
                    }
                    SipEvent::Final {
                        status,
                        body: if answered {
                            response.body.clone()
                        } else {
                            Vec::new()
                        },
                        dialog: answered.then_some(dialog),
                    }
                }
                Ok((dialog, None)) => {
                    dialogs.remove_dialog(&dialog.id());
                    SipEvent::Failed("no final response".to_owned())
                }
                Err(e) => SipEvent::Failed(e.to_string()),
            };
            let _ = events.send(event);
        });
        Ok(events_rx)
    }

    /// CANCEL the pending INVITE of dialog `id`.
    pub async fn cancel(&self, id: &DialogId) -> Result<(), TelephonyError> {
        match self.dialogs.get_dialog(id) {
            Some(Dialog::Invite(dialog)) => dialog
                .cancel()
                .await
                .map_err(|e| TelephonyError::Sip(format!("CANCEL: {e}"))),
            _ => Err(TelephonyError::Sip(
                "CANCEL: the dialog is already gone".to_owned(),
            )),
        }
    }

    /// End an answered call with BYE.
    pub async fn bye(&self, dialog: &InviteDialog) -> Result<(), TelephonyError> {
        let result = dialog
            .bye()
            .await
            .map_err(|e| TelephonyError::Sip(format!("BYE: {e}")));
        self.dialogs.remove_dialog(&dialog.id());
        result
    }
}

impl SipAgent {
    /// Keep `line` registered with `manager` (our Contact: this agent's address), asking for
    /// `expires` seconds, until `stop`; then unregister. Every attempt's outcome goes to
    /// `registered`.
    pub async fn keep_registered(
        &self,
        manager: &CallManager,
        line: &LineCredentials,
        expires: u32,
        stop: CancellationToken,
        registered: tokio::sync::watch::Sender<bool>,
    ) -> Result<(), TelephonyError> {
        use rsipstack::dialog::registration::{RefreshOutcome, Registration};
        let server = manager.registrar()?;
        let mut registration =
            Registration::new(self.endpoint.inner.clone(), Some(line.credential()));
        if manager.transport == SipTransportKind::Udp {
            let contact = Uri::try_from(
                format!(
                    "sip:{}@{}:{}",
                    line.username,
                    self.public,
                    self.local.port()
                )
                .as_str(),
            )
            .map_err(|e| TelephonyError::Config(format!("Contact: {e}")))?;
            registration.contact = Some(rsipstack::sip::typed::Contact {
                display_name: None,
                uri: contact,
                params: vec![],
            });
        }
        registration
            .keep_alive(server.clone(), expires, stop, |outcome| {
                let now = match outcome {
                    RefreshOutcome::Registered(_) => true,
                    RefreshOutcome::Rejected(response) => {
                        tracing::warn!(
                            status = response.status_code.code(),
                            "the call manager refused the line's registration"
                        );
                        false
                    }
                    RefreshOutcome::Failed(e) => {
                        tracing::warn!(error = %e, "registering the line failed");
                        false
                    }
                };
                if *registered.borrow() != now {
                    tracing::info!(registered = now, "line registration");
                }
                registered.send_replace(now);
            })
            .await;
        // Leaving: take the binding away, so the call manager routes nothing to a bridge that
        // is gone (bounded: a call manager that is down does not hold the shutdown up).
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            registration.register(server, Some(0)),
        )
        .await;
        registered.send_replace(false);
        Ok(())
    }
}

/// Requests from outside: in-dialog ones go to their dialog; we place calls, we never take them.
async fn serve_incoming(
    mut incoming: TransactionReceiver,
    dialogs: Arc<DialogLayer>,
    shutdown: CancellationToken,
) {
    loop {
        let mut tx = tokio::select! {
            _ = shutdown.cancelled() => return,
            tx = incoming.recv() => match tx {
                Some(tx) => tx,
                None => return,
            },
        };
        let dialogs = dialogs.clone();
        tokio::spawn(async move {
            if let Some(Dialog::Invite(mut dialog)) = dialogs.match_dialog(&tx) {
                if let Err(e) = dialog.handle(&mut tx).await {
                    tracing::debug!(error = %e, "in-dialog request failed");
                }
                return;
            }
            let status = match tx.original.method {
                Method::Options => StatusCode::OK,
                Method::Ack => return,
                Method::Bye | Method::Cancel => StatusCode::CallTransactionDoesNotExist,
                _ => StatusCode::Forbidden,
            };
            if let Err(e) = tx.reply(status).await {
                tracing::debug!(error = %e, "reply to an out-of-dialog request failed");
            }
        });
    }
}
