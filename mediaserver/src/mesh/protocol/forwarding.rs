//! What this server forwards (DESIGN.md §5, "Forwarding"): the packets of a local stream go to
//! every other live server with participants in the room while the stream is on the accepted
//! global list or margin and voice-active locally. Until the accepted list's switch tick the list
//! still in force counts too, so a speaker leaving the list is heard to the end of its term.
//!
//! Read-only views of the room state, asked by the shell once per tick (or per packet). Per room
//! the mesh forwards at most `(topSpeakers + extraCandidates) × (servers − 1)` streams, whatever
//! the participant count, and a server whose participants are all silent forwards nothing.

use super::rooms::{GlobalList, Room};
use super::{MeshNodeState, ServerId};
use crate::media::StreamId;

impl MeshNodeState {
    /// The servers a local stream's packets go to now (sorted); empty when it is not forwarded.
    /// It allocates; per packet, prefer caching [`Self::forwarding`] once per tick.
    pub fn forward_targets(&self, room: &str, stream: StreamId) -> Vec<ServerId> {
        match self.rooms.get(room) {
            Some(r) if self.forwards(r, stream) => self.room_targets(room),
            _ => Vec::new(),
        }
    }

    /// Every local stream of `room` that is forwarded now, with its targets.
    pub fn forwarding(&self, room: &str) -> Vec<(StreamId, Vec<ServerId>)> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        let targets = self.room_targets(room);
        if targets.is_empty() {
            return Vec::new();
        }
        r.local_candidates
            .iter()
            .filter(|c| self.forwards(r, c.stream))
            .map(|c| (c.stream, targets.clone()))
            .collect()
    }

    /// Stream copies forwarded now over all rooms (streams × targets).
    pub fn forwarded_stream_count(&self) -> usize {
        self.rooms
            .keys()
            .map(|room| {
                self.forwarding(room)
                    .iter()
                    .map(|(_, t)| t.len())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Whether local stream `stream` is forwarded: on the accepted list or margin (or, until the
    /// accepted list's switch tick, on the list still in force), and voice-active here.
    fn forwards(&self, r: &Room, stream: StreamId) -> bool {
        let names = |g: &GlobalList| g.forwards(&self.self_id, stream);
        let pending = self.now < r.switch_at;
        r.local_participants > 0
            && (r.current.as_ref().is_some_and(names)
                || (pending && r.previous.as_ref().is_some_and(names)))
            && r.local_candidates
                .iter()
                .any(|c| c.stream == stream && c.voice)
    }

    /// Live peers that announced participants in `room`, sorted.
    fn room_targets(&self, room: &str) -> Vec<ServerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.alive && p.rooms.contains(room))
            .map(|(id, _)| id.clone())
            .collect()
    }
}
