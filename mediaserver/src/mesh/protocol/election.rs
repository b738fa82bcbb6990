//! Who is the primary of a room (DESIGN.md §5, "Primary").
//!
//! The rendezvous order of a room is the plan's nodes sorted by
//! `SHA-256("chorus-rendezvous\0" || room || "\0" || id)` (first 8 bytes, big-endian, highest
//! first; ties by id), and the primary is the first live server in it. Only the plan and the
//! liveness view enter, so every server with the same view names the same primary, and when it
//! dies the next in order takes over.
//!
//! Primaries are re-elected at every poll, when a peer is heard anew or restarts, and when a room
//! is created; not per message (rooms are many, messages more). Becoming a room's primary starts a term (a `Lead`, with its
//! grace period) and counts a takeover; losing it ends the term. Either way the local list is
//! due at once, to the new primary.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::lead::Lead;
use super::liveness::Peer;
use super::rooms::Room;
use super::{MeshCounters, MeshNodeState, ServerId};
use crate::mesh::wire;

/// The rendezvous order of `room` over `nodes`: highest score first, ties by id.
pub fn rendezvous_order(room: &str, nodes: &[ServerId]) -> Vec<ServerId> {
    let mut scored: Vec<(u64, &ServerId)> = nodes
        .iter()
        .map(|id| {
            let mut h = Sha256::new();
            h.update(b"chorus-rendezvous\0");
            h.update(room.as_bytes());
            h.update([0u8]);
            h.update(id.as_bytes());
            (wire::first_u64(&h.finalize()), id)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, id)| id.clone()).collect()
}

impl MeshNodeState {
    /// The primary of `room` in this server's view.
    pub fn primary(&self, room: &str) -> Option<ServerId> {
        match self.rooms.get(room) {
            Some(r) => r.primary.clone(),
            None => self.primary_in(&rendezvous_order(room, &self.nodes)),
        }
    }

    /// The first live server of a rendezvous `order`.
    pub(super) fn primary_in(&self, order: &[ServerId]) -> Option<ServerId> {
        primary_of(order, &self.self_id, self.in_plan, &self.peers)
    }

    /// Re-elects the primary of every room from the current liveness view.
    pub(super) fn refresh_primaries(&mut self, now: Duration) {
        for r in self.rooms.values_mut() {
            update_primary(
                r,
                &self.self_id,
                self.in_plan,
                &self.peers,
                now,
                &mut self.counters,
            );
        }
    }
}

/// Re-elect the primary of one room; on a change, start or end this server's term and send the
/// local list to the new primary at the next poll.
pub(super) fn update_primary(
    r: &mut Room,
    self_id: &str,
    in_plan: bool,
    peers: &BTreeMap<ServerId, Peer>,
    now: Duration,
    counters: &mut MeshCounters,
) {
    let p = primary_of(&r.order, self_id, in_plan, peers);
    if p == r.primary {
        return;
    }
    if p.as_deref() == Some(self_id) {
        r.lead = Some(Lead::new(now));
        counters.takeovers += 1;
    } else {
        r.lead = None;
    }
    r.primary = p;
    r.next_rank = None;
}

/// The first server of `order` that is live in this server's view (itself: when in the plan).
fn primary_of(
    order: &[ServerId],
    self_id: &str,
    in_plan: bool,
    peers: &BTreeMap<ServerId, Peer>,
) -> Option<ServerId> {
    order
        .iter()
        .find(|id| {
            if id.as_str() == self_id {
                in_plan
            } else {
                peers.get(*id).is_some_and(|p| p.alive)
            }
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_rendezvous_is_a_permutation_and_stable() {
        let nodes: Vec<ServerId> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let o1 = rendezvous_order("room", &nodes);
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(o1, rendezvous_order("room", &reversed));
        let mut sorted = o1.clone();
        sorted.sort();
        assert_eq!(sorted, nodes);
    }
}
