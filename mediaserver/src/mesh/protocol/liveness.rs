//! Peer liveness and room membership in this server's view (DESIGN.md §5, "Membership").
//!
//! Every `heartbeat_interval` a heartbeat goes to every peer of the plan. Any message from a peer
//! proves it alive; a peer unheard for `ProtocolConfig::heartbeat_timeout` is dead. Peers start
//! dead until heard, so a server that starts alone does not wait for the others. A heartbeat
//! carries the sender's incarnation: a changed one means the peer restarted, and what it
//! announced before (rooms, local lists) is forgotten. The rooms with local participants go to
//! every peer on change and every `membership_refresh`.
//!
//! Invariants: the peer set is exactly the plan's other nodes (kept by `on_plan`), so nothing a
//! peer sends adds a peer; a change in who is alive (a peer heard anew, restarted or timed out)
//! re-elects primaries, and a peer heard anew or restarted restarts the grace period of every
//! term this server leads, because its reports are needed before a new list.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{MeshNodeState, Outgoing, ServerId};
use crate::mesh::error::MeshError;
use crate::mesh::wire::ControlMessage;

/// What this server knows of one peer of the plan.
#[derive(Debug, Default)]
pub(super) struct Peer {
    pub(super) last_heard: Option<Duration>,
    pub(super) alive: bool,
    pub(super) incarnation: Option<u64>,
    pub(super) generation: Option<i64>,
    pub(super) rooms: BTreeSet<String>,
}

impl MeshNodeState {
    /// Whether `id` is live in this server's view (this server is live when it is in the plan).
    pub fn is_alive(&self, id: &str) -> bool {
        if id == self.self_id {
            return self.in_plan;
        }
        self.peers.get(id).is_some_and(|p| p.alive)
    }

    /// Peers live in this server's view, sorted.
    pub fn live_peers(&self) -> Vec<ServerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The plan generation a peer announced in its last heartbeat.
    pub fn peer_generation(&self, id: &str) -> Option<i64> {
        self.peers.get(id).and_then(|p| p.generation)
    }

    /// A heartbeat: records the peer's incarnation and plan generation. Returns whether the
    /// incarnation changed, i.e. the peer restarted; its announced rooms are then forgotten.
    pub(super) fn on_heartbeat(
        &mut self,
        from: &str,
        incarnation: u64,
        generation: i64,
    ) -> Result<bool, MeshError> {
        let Some(peer) = self.peers.get_mut(from) else {
            return Err(MeshError::UnknownPeer(from.to_owned()));
        };
        let restarted = peer.incarnation.is_some_and(|i| i != incarnation);
        if restarted {
            peer.rooms.clear();
        }
        peer.incarnation = Some(incarnation);
        peer.generation = Some(generation);
        Ok(restarted)
    }

    /// Any message proves its sender alive. When that is news, or the sender `restarted`, every
    /// term this server leads restarts its grace period (the peer's reports are needed before a
    /// new list), a restarted peer's lists are dropped, and primaries are re-elected.
    pub(super) fn on_peer_heard(
        &mut self,
        from: &str,
        restarted: bool,
        now: Duration,
    ) -> Result<(), MeshError> {
        let Some(peer) = self.peers.get_mut(from) else {
            return Err(MeshError::UnknownPeer(from.to_owned()));
        };
        peer.last_heard = Some(now);
        let came_alive = !peer.alive;
        peer.alive = true;
        if came_alive || restarted {
            for r in self.rooms.values_mut() {
                if restarted {
                    r.remote.remove(from);
                }
                if let Some(lead) = &mut r.lead {
                    lead.enter_grace(now);
                }
            }
            // Liveness changed only now; otherwise primaries stand (rooms are many, messages
            // more).
            self.refresh_primaries(now);
        }
        Ok(())
    }

    /// The full set of rooms a peer has participants in: it replaces the previous set, and the
    /// peer's lists for rooms it left are dropped. Rooms that cannot be kept (invalid name, room
    /// limit) are refused with the last such error, the others still apply.
    pub(super) fn on_room_membership(
        &mut self,
        from: &str,
        rooms: Vec<String>,
    ) -> Result<(), MeshError> {
        let mut set = BTreeSet::new();
        let mut result = Ok(());
        for room in rooms {
            match self.ensure_room(&room) {
                Ok(_) => {
                    set.insert(room);
                }
                Err(e) => result = Err(e),
            }
        }
        if let Some(peer) = self.peers.get_mut(from) {
            let left: Vec<String> = peer.rooms.difference(&set).cloned().collect();
            peer.rooms = set;
            for room in left {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.remote.remove(from);
                }
            }
        }
        result
    }

    /// Marks dead every live peer unheard for the heartbeat timeout.
    pub(super) fn expire_silent_peers(&mut self, now: Duration) {
        let timeout = self.config.heartbeat_timeout();
        for peer in self.peers.values_mut() {
            if peer.alive
                && peer
                    .last_heard
                    .is_none_or(|t| now.saturating_sub(t) > timeout)
            {
                peer.alive = false;
            }
        }
    }

    /// A heartbeat to every peer of the plan when one is due, dead peers included: a dead peer
    /// has to hear from this server to count it alive again.
    pub(super) fn send_heartbeats_if_due(&mut self, now: Duration) {
        if now >= self.next_heartbeat {
            let sent_at_us = u64::try_from(now.as_micros()).unwrap_or(u64::MAX);
            for id in self.peers.keys() {
                self.outbox.push(Outgoing {
                    to: id.clone(),
                    msg: ControlMessage::Heartbeat {
                        sent_at_us,
                        incarnation: self.incarnation,
                        generation: self.generation,
                    },
                });
            }
            self.next_heartbeat = now + self.config.heartbeat_interval;
        }
    }

    /// The rooms with local participants to every peer, when they changed or the refresh is due.
    pub(super) fn announce_membership_if_due(&mut self, now: Duration) {
        if self.membership_dirty || now >= self.next_membership {
            let rooms: Vec<String> = self
                .rooms
                .iter()
                .filter(|(_, r)| r.local_participants > 0)
                .map(|(n, _)| n.clone())
                .collect();
            for id in self.peers.keys() {
                self.outbox.push(Outgoing {
                    to: id.clone(),
                    msg: ControlMessage::RoomMembership {
                        rooms: rooms.clone(),
                    },
                });
            }
            self.membership_dirty = false;
            self.next_membership = now + self.config.membership_refresh;
        }
    }

    /// Live peers with participants in `room` (by membership or a fresh local list), sorted.
    pub(super) fn members(&self, room: &str, now: Duration) -> Vec<ServerId> {
        let ttl = self.list_ttl();
        let r = self.rooms.get(room);
        self.peers
            .iter()
            .filter(|(id, p)| {
                p.alive
                    && (p.rooms.contains(room)
                        || r.and_then(|r| r.remote.get(*id))
                            .is_some_and(|l| now.saturating_sub(l.received) <= ttl))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether a server that announced participants in `room` recently is now unreachable. It
    /// cannot be mixing the current list (it never got it), so consistency counts it as a miss
    /// until the room linger passes: a partition shows up in the metric, not only a slow peer.
    pub(super) fn has_unreachable_member(&self, room: &str, now: Duration) -> bool {
        self.peers.values().any(|p| {
            !p.alive
                && p.rooms.contains(room)
                && p.last_heard
                    .is_some_and(|heard| now.saturating_sub(heard) <= self.config.room_linger)
        })
    }
}
