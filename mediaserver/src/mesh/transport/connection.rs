//! One mesh connection's life: dialling with backoff, accepting and identifying a dialer, and
//! running a live connection (control frames both ways, application pings for RTT, inbound
//! datagrams) until it ends.
//!
//! Invariants:
//! - a peer's slot holds at most one live connection: a newer one closes and replaces the
//!   older, and an ending connection clears the slot only if it is still the one there, so a
//!   replaced connection cannot unregister its successor;
//! - only the lower server id dials; an accept from a higher id is refused, or two connections
//!   would keep replacing each other;
//! - a dial or an accept, `Hello` included, is bounded by `handshake_timeout`, so a silent peer
//!   cannot hold a task forever;
//! - a full inbound datagram queue drops and counts, so media never wait for a slow caller;
//!   inbound control messages wait for room instead, which holds back the peer's stream;
//! - nothing a peer sends panics this code: a bad frame body is counted and skipped, a broken
//!   stream ends the connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Counters, Inner, Live, add};
use crate::mesh::error::MeshError;
use crate::mesh::frame::{Frame, read_frame};
use crate::mesh::metrics::{DIRECTION_IN, DIRECTION_OUT};
use crate::mesh::protocol::ServerId;
use crate::mesh::tls::verify_identity;

impl Inner {
    async fn dial(
        &self,
        peer: &str,
        addr: &str,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), MeshError> {
        let sockaddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| MeshError::io(&format!("cannot resolve {addr:?}"), e))?
            .next()
            .ok_or_else(|| MeshError::Io(format!("{addr:?} resolves to no address")))?;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), sockaddr, peer)
            .map_err(|e| MeshError::io("cannot start a connection", e))?;
        let handshake = async {
            let conn = connecting
                .await
                .map_err(|e| MeshError::tls(&format!("handshake with {peer:?} failed"), e))?;
            let (mut send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| MeshError::io("cannot open the control stream", e))?;
            let hello = Frame::Hello {
                server_id: self.self_id.clone(),
            }
            .encode()?;
            send.write_all(&hello)
                .await
                .map_err(|e| MeshError::io("cannot send hello", e))?;
            Ok::<_, MeshError>((conn, send, recv))
        };
        tokio::time::timeout(self.config.handshake_timeout, handshake)
            .await
            .map_err(|_| MeshError::Io(format!("handshake with {peer:?} timed out")))?
    }

    async fn handle_incoming(self: Arc<Self>, incoming: quinn::Incoming) -> Result<(), MeshError> {
        let accept = async {
            let conn = incoming
                .accept()
                .map_err(|e| MeshError::io("cannot accept", e))?
                .await
                .map_err(|e| MeshError::tls("inbound handshake failed", e))?;
            let (send, mut recv) = conn
                .accept_bi()
                .await
                .map_err(|e| MeshError::io("no control stream", e))?;
            let (_, hello) = read_frame(&mut recv).await?;
            Ok::<_, MeshError>((conn, send, recv, hello))
        };
        let (conn, send, recv, hello) = tokio::time::timeout(self.config.handshake_timeout, accept)
            .await
            .map_err(|_| MeshError::Io("inbound handshake timed out".into()))??;
        let server_id = match hello {
            Ok(Frame::Hello { server_id }) => server_id,
            Ok(_) => {
                conn.close(1u32.into(), b"expected hello");
                return Err(MeshError::invalid(
                    "hello frame",
                    "first frame is not hello",
                ));
            }
            Err(e) => {
                conn.close(1u32.into(), b"bad hello");
                return Err(e);
            }
        };
        if !self.lock_peers().contains_key(&server_id) {
            conn.close(2u32.into(), b"not in plan");
            return Err(MeshError::UnknownPeer(server_id));
        }
        if server_id > self.self_id {
            // The lower id dials; accepting the other direction too would make two connections
            // replace each other forever.
            conn.close(4u32.into(), b"lower id dials");
            return Err(MeshError::invalid(
                "hello frame",
                format!(
                    "{server_id:?} dialled {:?}; the lower id dials",
                    self.self_id
                ),
            ));
        }
        let chain = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
        let verified = match chain {
            Some(chain) => verify_identity(&self.verifier, &chain, &server_id),
            None => Err(MeshError::Tls("peer presented no certificate".into())),
        };
        if let Err(e) = verified {
            conn.close(3u32.into(), b"identity mismatch");
            return Err(e);
        }
        self.run_connection(&server_id, conn, send, recv).await;
        Ok(())
    }

    async fn run_connection(
        &self,
        peer: &str,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.control_queue.max(1));
        let stats = {
            let mut slots = self.lock_peers();
            let Some(slot) = slots.get_mut(peer) else {
                conn.close(2u32.into(), b"not in plan");
                return;
            };
            let old = slot.live.replace(Live {
                id,
                conn: conn.clone(),
                frames: tx.clone(),
            });
            if let Some(old) = old {
                old.conn.close(0u32.into(), b"replaced");
            }
            slot.stats.connects.fetch_add(1, Ordering::Relaxed);
            slot.stats.clone()
        };
        info!(peer, remote = %conn.remote_address(), "mesh peer connected");
        let outcome = tokio::select! {
            r = self.write_loop(peer, &conn, &mut send, rx, &stats) => r,
            r = self.read_loop(peer, &mut recv, &tx, &stats) => r,
            r = self.datagram_loop(peer, &conn, &stats) => r,
            _ = self.shutdown.cancelled() => Ok(()),
        };
        if let Err(e) = &outcome {
            debug!(peer, error = %e, "mesh connection ended");
        }
        {
            let mut slots = self.lock_peers();
            if let Some(slot) = slots.get_mut(peer)
                && slot.live.as_ref().is_some_and(|l| l.id == id)
            {
                slot.live = None;
            }
        }
        conn.close(0u32.into(), b"closed");
        info!(peer, "mesh peer disconnected");
    }

    async fn write_loop(
        &self,
        peer: &str,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        mut rx: mpsc::Receiver<Vec<u8>>,
        stats: &Counters,
    ) -> Result<(), MeshError> {
        let mut ping = tokio::time::interval(self.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let frame = tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => return Ok(()),
                },
                _ = ping.tick() => {
                    if let Some(m) = &self.metrics {
                        let app = stats.app_rtt_us.load(Ordering::Relaxed);
                        let rtt = if app > 0 { Duration::from_micros(app - 1) } else { conn.rtt() };
                        m.set_rtt(peer, rtt);
                    }
                    Frame::Ping(self.now_us()).encode()?
                }
            };
            send.write_all(&frame)
                .await
                .map_err(|e| MeshError::io("control stream write failed", e))?;
            add(&stats.bytes_out, frame.len());
            if let Some(m) = &self.metrics {
                m.record_traffic(peer, DIRECTION_OUT, frame.len(), false);
            }
        }
    }

    async fn read_loop(
        &self,
        peer: &str,
        recv: &mut quinn::RecvStream,
        tx: &mpsc::Sender<Vec<u8>>,
        stats: &Counters,
    ) -> Result<(), MeshError> {
        loop {
            let (len, frame) = read_frame(recv).await?;
            add(&stats.bytes_in, len);
            if let Some(m) = &self.metrics {
                m.record_traffic(peer, DIRECTION_IN, len, false);
            }
            match frame {
                Ok(Frame::Control(msg)) => {
                    stats.control_in.fetch_add(1, Ordering::Relaxed);
                    self.control_tx
                        .send((peer.to_owned(), msg))
                        .await
                        .map_err(|_| MeshError::Closed)?;
                }
                Ok(Frame::Ping(t)) => {
                    // Best effort: a full queue just skips one RTT sample.
                    let _ = tx.try_send(Frame::Pong(t).encode()?);
                }
                Ok(Frame::Pong(t)) => {
                    let rtt = self.now_us().saturating_sub(t);
                    stats
                        .app_rtt_us
                        .store(rtt.saturating_add(1), Ordering::Relaxed);
                    if let Some(m) = &self.metrics {
                        m.set_rtt(peer, Duration::from_micros(rtt));
                    }
                }
                Ok(Frame::Hello { .. }) => {}
                Err(e) => {
                    debug!(peer, error = %e, "mesh frame refused");
                    self.record_error(&e);
                }
            }
        }
    }

    async fn datagram_loop(
        &self,
        peer: &str,
        conn: &quinn::Connection,
        stats: &Counters,
    ) -> Result<(), MeshError> {
        loop {
            let d = conn
                .read_datagram()
                .await
                .map_err(|e| MeshError::io("connection lost", e))?;
            stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
            add(&stats.bytes_in, d.len());
            if let Some(m) = &self.metrics {
                m.record_traffic(peer, DIRECTION_IN, d.len(), true);
            }
            if self.datagram_tx.try_send((peer.to_owned(), d)).is_err() {
                stats.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub(super) async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            i = inner.endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.clone().handle_incoming(incoming).await {
                debug!(error = %e, "mesh inbound connection refused");
                inner.record_error(&e);
            }
        });
    }
}

pub(super) async fn dial_loop(
    inner: Arc<Inner>,
    peer: ServerId,
    addr: String,
    cancel: CancellationToken,
) {
    let min = inner.config.backoff_min.max(Duration::from_millis(1));
    let max = inner.config.backoff_max.max(min);
    let mut backoff = min;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match inner.dial(&peer, &addr).await {
            Ok((conn, send, recv)) => {
                let up = Instant::now();
                inner.run_connection(&peer, conn, send, recv).await;
                if up.elapsed() >= Duration::from_secs(1) {
                    backoff = min;
                }
            }
            Err(e) => {
                debug!(peer = %peer, error = %e, "mesh dial failed");
                inner.record_error(&e);
            }
        }
        let quarter = u64::try_from(backoff.as_micros() / 4).unwrap_or(0).max(1);
        let jitter = Duration::from_micros(rand::random::<u64>() % quarter);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}
