//! The listener's side of ICE against an ICE-lite server (Chorus) or a full agent (Janus), with
//! `rtc::stun` messages.
//!
//! The listener is the full, controlling agent (RFC 8445 §6.1.1: the lite side is always
//! controlled; against a full agent, the offerer controls). It has one candidate pair (its socket, the server's host candidate), so there is
//! nothing to gather or prioritise. Like a browser it nominates regularly (RFC 8445 §8.1.1):
//! checks without `USE-CANDIDATE` until one succeeds, then one with it until that succeeds. Not
//! a formality: `rtc`'s controlled agent answers a `USE-CANDIDATE` check only once its own
//! (triggered) check of the pair has succeeded, and a server routing by address learns the
//! listener's address from its first successful check, so nominating first can deadlock. It
//! then keeps sending nominating checks as consent freshness (RFC 7675) while it runs. Requests are authenticated with the
//! server's password, responses checked with it; a request from the server would be checked with
//! the listener's own password and answered (a lite server normally sends none; Janus' libnice
//! checks the pair from its side and keeps it alive with requests of its own).
//!
//! Invariants: nothing here trusts a message that failed MESSAGE-INTEGRITY or FINGERPRINT; a
//! response is matched to a request by transaction ID by the caller.

use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow, bail};
use rand::Rng;
use rand::distr::Alphanumeric;
use rtc::crypto::RTCCrypto;
use rtc::stun::attributes::{
    ATTR_ICE_CONTROLLING, ATTR_PRIORITY, ATTR_USE_CANDIDATE, ATTR_USERNAME,
};
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Message, Setter, TransactionId};
use rtc::stun::textattrs::TextAttribute;
use rtc::stun::xoraddr::XorMappedAddress;

/// Length of the listener's random ICE ufrag (RFC 8445 §5.3: at least 4 characters).
const UFRAG_LEN: usize = 16;
/// Length of the listener's random ICE password (RFC 8445 §5.3: at least 22 characters).
const PWD_LEN: usize = 32;
/// PRIORITY of the listener's checks: what a peer-reflexive candidate learned from them would
/// get (RFC 8445 §7.1.1: type preference 110, local preference 65535, component 1).
const PRFLX_PRIORITY: u32 = (110 << 24) | (65535 << 8) | 255;

/// Both sides' ICE credentials and the listener's tie-breaker.
#[derive(Debug, Clone)]
pub(crate) struct IceCredentials {
    pub(crate) local_ufrag: String,
    pub(crate) local_pwd: String,
    pub(crate) remote_ufrag: String,
    pub(crate) remote_pwd: String,
    /// ICE-CONTROLLING's tie-breaker (random per listener, RFC 8445 §7.1.3).
    pub(crate) tie_breaker: u64,
}

/// A fresh random local ufrag and password (remote ones are filled in from the answer).
pub(crate) fn local_credentials() -> (String, String) {
    let random = |len| {
        rand::rng()
            .sample_iter(Alphanumeric)
            .take(len)
            .map(char::from)
            .collect::<String>()
    };
    (random(UFRAG_LEN), random(PWD_LEN))
}

/// A Binding Request: USERNAME `remote:local`, PRIORITY, ICE-CONTROLLING, USE-CANDIDATE if
/// `nominate`, MESSAGE-INTEGRITY keyed with the server's password, FINGERPRINT.
pub(crate) fn binding_request(
    credentials: &IceCredentials,
    nominate: bool,
    crypto: &dyn RTCCrypto,
) -> Result<(TransactionId, Vec<u8>)> {
    let mut message = Message::new();
    let username = format!("{}:{}", credentials.remote_ufrag, credentials.local_ufrag);
    message
        .build(&[
            Box::new(BINDING_REQUEST),
            Box::new(TransactionId::new()),
            Box::new(TextAttribute::new(ATTR_USERNAME, username)),
        ])
        .map_err(|e| anyhow!("building a binding request: {e}"))?;
    message.add(ATTR_PRIORITY, &PRFLX_PRIORITY.to_be_bytes());
    message.add(ATTR_ICE_CONTROLLING, &credentials.tie_breaker.to_be_bytes());
    if nominate {
        message.add(ATTR_USE_CANDIDATE, &[]);
    }
    MessageIntegrity::new_short_term_integrity_with_provider(
        credentials.remote_pwd.clone(),
        crypto,
    )
    .add_to(&mut message)
    .map_err(|e| anyhow!("signing a binding request: {e}"))?;
    FINGERPRINT
        .add_to(&mut message)
        .map_err(|e| anyhow!("fingerprinting a binding request: {e}"))?;
    Ok((message.transaction_id, message.raw))
}

/// A STUN datagram, once checked.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A Binding Success Response that passed integrity (server's password) and fingerprint.
    Success(TransactionId),
    /// A Binding Request for this listener that passed integrity (listener's password); the
    /// bytes are the response to send back.
    Request(Vec<u8>),
}

/// Checks one STUN datagram from `from`. Errors say why it was not accepted.
pub(crate) fn inbound(
    datagram: &[u8],
    from: SocketAddr,
    credentials: &IceCredentials,
    crypto: &dyn RTCCrypto,
) -> Result<Inbound> {
    let mut message = Message::new();
    message
        .unmarshal_binary(datagram)
        .map_err(|e| anyhow!("undecodable STUN: {e}"))?;
    FINGERPRINT
        .check(&message)
        .map_err(|e| anyhow!("STUN fingerprint: {e}"))?;
    if message.typ == BINDING_SUCCESS {
        MessageIntegrity::check(&mut message, credentials.remote_pwd.as_bytes(), crypto)
            .map_err(|e| anyhow!("binding response integrity: {e}"))?;
        return Ok(Inbound::Success(message.transaction_id));
    }
    if message.typ != BINDING_REQUEST {
        bail!("unexpected STUN message {}", message.typ);
    }
    let username = TextAttribute::get_from_as(&message, ATTR_USERNAME)
        .map_err(|e| anyhow!("binding request without USERNAME: {e}"))?
        .to_string();
    let expected = format!("{}:{}", credentials.local_ufrag, credentials.remote_ufrag);
    if username != expected {
        bail!("binding request for `{username}`, expected `{expected}`");
    }
    MessageIntegrity::check(&mut message, credentials.local_pwd.as_bytes(), crypto)
        .map_err(|e| anyhow!("binding request integrity: {e}"))?;
    let mut response = Message::new();
    response
        .build(&[
            Box::new(message.clone()),
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                credentials.local_pwd.clone(),
                crypto,
            )),
            Box::new(FINGERPRINT),
        ])
        .map_err(|e| anyhow!("building a binding response: {e}"))
        .context("answering the server's binding request")?;
    Ok(Inbound::Request(response.raw))
}
