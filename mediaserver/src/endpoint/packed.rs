//! Datagrams packed end to end in one buffer until the port's next `sendmmsg` round.
//!
//! The listener fan-out writes thousands of small packets per frame. Packing them into one
//! reused buffer costs no allocation per packet (a `BytesMut` each did) and keeps them adjacent
//! in memory for the system call. A packet is written in place (header, payload, then sealed),
//! then committed with its destination, or abandoned, which truncates it away.
//!
//! Invariant: every committed range lies inside the buffer, and ranges do not overlap.

use std::net::SocketAddr;
use std::ops::Range;

/// Packets waiting to be sent, and their destinations.
#[derive(Debug, Default)]
pub(crate) struct PackedDatagrams {
    bytes: Vec<u8>,
    packets: Vec<(SocketAddr, Range<usize>)>,
}

impl PackedDatagrams {
    /// Where the next packet starts; write it with [`Self::bytes_mut`], then [`Self::commit`]
    /// or [`Self::abandon`] it.
    pub(crate) fn begin(&self) -> usize {
        self.bytes.len()
    }

    /// The buffer to append the packet begun at [`Self::begin`] to. Bytes before that offset
    /// belong to committed packets and must not change.
    pub(crate) fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// The packet from `start` to the end of the buffer goes to `to`.
    pub(crate) fn commit(&mut self, to: SocketAddr, start: usize) {
        debug_assert!(start <= self.bytes.len());
        self.packets.push((to, start..self.bytes.len()));
    }

    /// Forget the packet begun at `start`.
    pub(crate) fn abandon(&mut self, start: usize) {
        self.bytes.truncate(start);
    }

    /// How many packets are committed.
    pub(crate) fn len(&self) -> usize {
        self.packets.len()
    }

    /// The committed packets, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.packets
            .iter()
            .map(|(to, range)| (*to, &self.bytes[range.clone()]))
    }

    /// Empties both lists, keeping their capacity for the next round.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.packets.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_packets_come_back_whole_and_abandoned_ones_vanish() {
        let a: SocketAddr = "127.0.0.1:1000".parse().expect("literal");
        let b: SocketAddr = "127.0.0.1:2000".parse().expect("literal");
        let mut packed = PackedDatagrams::default();
        let s = packed.begin();
        packed.bytes_mut().extend_from_slice(b"first");
        packed.commit(a, s);
        let s = packed.begin();
        packed.bytes_mut().extend_from_slice(b"dropped");
        packed.abandon(s);
        let s = packed.begin();
        packed.bytes_mut().extend_from_slice(b"second!");
        packed.commit(b, s);
        let got: Vec<(SocketAddr, Vec<u8>)> =
            packed.iter().map(|(to, p)| (to, p.to_vec())).collect();
        assert_eq!(got, vec![(a, b"first".to_vec()), (b, b"second!".to_vec())]);
        assert_eq!(packed.len(), 2);
        packed.clear();
        assert_eq!(packed.len(), 0);
        assert_eq!(packed.begin(), 0);
    }
}
