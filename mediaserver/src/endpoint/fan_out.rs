//! One room frame's listener fan-out, split across the port's worker threads.
//!
//! Per listener-packet the port writes a 12-byte header, copies the shared Opus payload, seals
//! it with that listener's own SRTP context and hands it to `sendmmsg`; the kernel's send path is
//! most of the cost. With one thread, a room of thousands of listeners keeps one core busy and
//! its last listener hears the frame a whole fan-out after its first. [`FanOutWorkers`] cuts the
//! room's listener list into contiguous lanes, one per worker, and each lane seals and sends its
//! listeners on its own thread, from the same socket (a UDP socket may be written from several
//! threads at once; the kernel orders nothing between them, and needs not: each listener's
//! packets come from one lane).
//!
//! Invariants:
//! - A listener's SRTP context is used by one thread at a time: lanes are disjoint `&mut`
//!   borrows of the sessions, and the port's task waits for every lane before it goes on
//!   (rayon's scoped jobs). So no nonce is ever sealed twice.
//! - Lanes keep the room's order: lane 0 takes the first listeners, and runs on the port's own
//!   thread; the others run on the pool's threads.
//! - Nothing is lost to a full socket buffer: a lane that meets `EWOULDBLOCK` stops sending and
//!   leaves the rest of its packets to the port's next flush, which waits for the socket.
//!
//! With the link-layer fan-out on (`link_layer.rs`), a lane hands its frames to the packet
//! socket of their interface instead, from its own thread, as it would write the UDP socket.
//!
//! The pool is rayon's: it lends borrowed work to long-lived threads safely, which is exactly
//! this. What runs in a lane is the same `Session::send_opus` the single-threaded path calls.

use std::time::Instant;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tracing::debug;

use super::link_layer::LinkLayer;
use super::packed::PackedDatagrams;
use super::session::Session;

/// Datagrams per `sendmmsg` call in a lane: the port's batch size.
const LANE_SEND_BATCH: usize = 256;

/// What one lane did with its share of a frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaneCounts {
    /// Listener-packets sealed.
    pub(crate) sealed: u64,
    /// Listeners that got nothing (not connected, or their seal failed).
    pub(crate) dropped: u64,
    /// Datagrams the kernel took.
    pub(crate) sent: u64,
    /// Datagrams lost to a send error.
    pub(crate) send_errors: u64,
}

/// The frame every lane sends, and what it is sent through.
#[derive(Clone, Copy)]
struct Frame<'a> {
    socket: &'a UdpSocket,
    link: Option<&'a LinkLayer>,
    payload: &'a Bytes,
    samples: u32,
    now: Instant,
}

/// One worker's buffer: the packets it sealed, and how many of them already left.
#[derive(Debug, Default)]
struct Lane {
    packed: PackedDatagrams,
    /// Packets of `packed` already sent; the rest wait for the port's flush.
    sent: usize,
    /// The socket refused more this round (`EWOULDBLOCK`): only seal from here on.
    blocked: bool,
}

/// The port's fan-out workers: the port's own thread plus `workers - 1` pooled ones.
#[derive(Debug)]
pub(crate) struct FanOutWorkers {
    pool: rayon::ThreadPool,
    lanes: Vec<Lane>,
}

impl FanOutWorkers {
    /// Workers for `workers` lanes (at least 2; one lane is the port's plain path). Fails if the
    /// OS refuses the threads.
    pub(crate) fn new(workers: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let workers = workers.max(2);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers - 1)
            .thread_name(|i| format!("chorus-fan-out-{}", i + 1))
            .build()?;
        let lanes = (0..workers).map(|_| Lane::default()).collect();
        Ok(FanOutWorkers { pool, lanes })
    }

    /// Seals `payload` for every listener in `listeners` (in the room's order; `None` for one
    /// the port does not have) and sends what the socket takes. Returns the lanes' counts
    /// summed. What was sealed but not sent is left for [`FanOutWorkers::pending`].
    pub(crate) fn fan_out(
        &mut self,
        listeners: &mut [Option<&mut Session>],
        socket: &UdpSocket,
        link: Option<&LinkLayer>,
        payload: &Bytes,
        samples: u32,
        now: Instant,
    ) -> LaneCounts {
        let frame = Frame {
            socket,
            link,
            payload,
            samples,
            now,
        };
        let per_lane = listeners.len().div_ceil(self.lanes.len()).max(1);
        let mut counts = vec![LaneCounts::default(); self.lanes.len()];
        self.pool.in_place_scope(|scope| {
            let mut work = listeners
                .chunks_mut(per_lane)
                .zip(self.lanes.iter_mut())
                .zip(counts.iter_mut());
            // Lane 0, the room's first listeners, runs here; the rest are handed to the pool
            // first so they start while this one works.
            let first = work.next();
            for ((chunk, lane), count) in work {
                scope.spawn(move |_| *count = fan_out_lane(lane, chunk, frame));
            }
            if let Some(((chunk, lane), count)) = first {
                *count = fan_out_lane(lane, chunk, frame);
            }
        });
        counts
            .iter()
            .fold(LaneCounts::default(), |sum, c| LaneCounts {
                sealed: sum.sealed + c.sealed,
                dropped: sum.dropped + c.dropped,
                sent: sum.sent + c.sent,
                send_errors: sum.send_errors + c.send_errors,
            })
    }

    /// Packets sealed by the lanes that the socket did not take yet, in lane order.
    pub(crate) fn pending(&self) -> impl Iterator<Item = (std::net::SocketAddr, &[u8])> {
        self.lanes
            .iter()
            .flat_map(|lane| lane.packed.iter().skip(lane.sent))
    }

    /// Forgets every lane's packets (after the port's flush sent the pending ones), keeping the
    /// buffers for the next frame.
    pub(crate) fn clear(&mut self) {
        for lane in &mut self.lanes {
            lane.packed.clear();
            lane.sent = 0;
            lane.blocked = false;
        }
    }
}

/// One lane: seal for each of `listeners` in turn, then send them all in [`LANE_SEND_BATCH`]
/// rounds. Sealing all first, as the port's own path does, keeps the lane's listeners within its
/// send time of each other: the lane's last packet leaves when it would have had the lane sent
/// as it sealed, but its first no longer leaves a whole lane's sealing earlier than the rest.
/// Never inlined: the bench counts this function's instructions by name, like the port's own
/// fan-out.
#[inline(never)]
fn fan_out_lane(
    lane: &mut Lane,
    listeners: &mut [Option<&mut Session>],
    frame: Frame<'_>,
) -> LaneCounts {
    let Frame {
        socket,
        link,
        payload,
        samples,
        now,
    } = frame;
    let mut counts = LaneCounts::default();
    for slot in listeners.iter_mut() {
        let sealed = match slot {
            Some(session) => session.send_opus(now, payload, samples, &mut lane.packed),
            None => false,
        };
        if sealed {
            counts.sealed += 1;
        } else {
            counts.dropped += 1;
        }
    }
    send_lane(lane, socket, link, &mut counts);
    counts
}

/// Sends what `lane` has not sent yet, until the socket would block.
fn send_lane(
    lane: &mut Lane,
    socket: &UdpSocket,
    link: Option<&LinkLayer>,
    counts: &mut LaneCounts,
) {
    while !lane.blocked && lane.sent < lane.packed.len() {
        let batch: Vec<_> = lane
            .packed
            .iter()
            .skip(lane.sent)
            .take(LANE_SEND_BATCH)
            .collect();
        let sent = match link {
            Some(link) => link.send_batch(socket, &batch),
            None => super::port::send_batch(socket, &batch),
        };
        match sent {
            Ok(0) => {
                // The kernel took none and reported no error: count the first as failed
                // rather than spin on it (as the port's flush does).
                counts.send_errors += 1;
                lane.sent += 1;
            }
            Ok(sent) => {
                counts.sent += sent as u64;
                lane.sent += sent;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => lane.blocked = true,
            Err(err) => {
                // `sendmmsg` fails only when the first datagram fails: that one is lost.
                debug!(to = %batch[0].0, %err, "media socket send failed");
                counts.send_errors += 1;
                lane.sent += 1;
            }
        }
    }
}
