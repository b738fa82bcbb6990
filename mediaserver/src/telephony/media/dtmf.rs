//! RFC 4733 telephone events (DTMF as RTP packets), and turning their packet stream into key
//! presses.
//!
//! A phone sends one key press as many packets: a first one (marker set), updates every packet
//! interval with a growing duration, then the final duration three times with the end bit set
//! (RFC 4733 §2.5.1.4: the end is repeated because it may be lost). Every packet of one press
//! carries the same RTP timestamp, the press's start (§2.3.1), which is what identifies it here;
//! the marker bit is not used, because the packet carrying it is as likely to be lost as any.
//!
//! Invariants of [`DtmfDetector`]:
//! - each press is reported exactly once: on its first end packet, or, if every end packet was
//!   lost, when the next press starts (or on [`DtmfDetector::flush`]);
//! - stragglers of an already reported press (late or reordered redundant packets) are dropped;
//! - its memory is fixed: the current press and the last few reported start timestamps.
//!
//! DTMF is never audio: the caller routes these packets here, never into a decoder or the mix.

use super::PhoneMediaError;

/// Length of one telephone-event payload (RFC 4733 §2.3).
pub const TELEPHONE_EVENT_LEN: usize = 4;

/// How many reported presses are remembered to drop their stragglers. Redundant packets arrive
/// within a few packet intervals; eight presses back is far beyond any reordering.
const REMEMBERED_PRESSES: usize = 8;

/// The DTMF key of an RFC 4733 event code (§3.2: 0–9, then `*`, `#`, `A`–`D`).
pub fn event_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some(char::from(b'0' + event)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + (event - 12))),
        _ => None,
    }
}

/// The RFC 4733 event code of a DTMF key (`0`–`9`, `*`, `#`, `A`–`D`, letters in either case).
pub fn digit_event(digit: char) -> Option<u8> {
    match digit {
        '0'..='9' => Some(digit as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => Some(digit as u8 - b'A' + 12),
        'a'..='d' => Some(digit as u8 - b'a' + 12),
        _ => None,
    }
}

/// One telephone-event payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TelephoneEvent {
    /// The event code (0–15 are DTMF keys; others are tones and line events).
    pub event: u8,
    /// The end bit: this is one of the packets closing the event.
    pub end: bool,
    /// Power level in -dBm0 (0..=63; larger is quieter).
    pub volume: u8,
    /// Duration so far, in timestamp units of the telephone-event clock (8000 Hz as we offer).
    pub duration: u16,
}

impl TelephoneEvent {
    /// Parses an RTP payload. Longer payloads are accepted and their first event read (extra
    /// bytes would only come from an RFC 2198-style bundling we do not offer).
    pub fn parse(payload: &[u8]) -> Result<Self, PhoneMediaError> {
        let bytes: &[u8; TELEPHONE_EVENT_LEN] = payload.first_chunk().ok_or(
            PhoneMediaError::MalformedDtmf("shorter than the 4-byte event"),
        )?;
        Ok(Self {
            event: bytes[0],
            end: bytes[1] & 0x80 != 0,
            // Bit 6 is reserved: ignored on receipt (§2.3).
            volume: bytes[1] & 0x3F,
            duration: u16::from_be_bytes([bytes[2], bytes[3]]),
        })
    }

    /// The payload bytes (the reserved bit is zero; volume is cut to its 6 bits).
    pub fn to_bytes(&self) -> [u8; TELEPHONE_EVENT_LEN] {
        let [high, low] = self.duration.to_be_bytes();
        [
            self.event,
            u8::from(self.end) << 7 | (self.volume & 0x3F),
            high,
            low,
        ]
    }

    /// The DTMF key, if the event is one.
    pub fn digit(&self) -> Option<char> {
        event_digit(self.event)
    }
}

/// One key press, reported once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DtmfPress {
    /// The key: `0`–`9`, `*`, `#`, `A`–`D`.
    pub digit: char,
    /// The RTP timestamp of the press's start (its packets' timestamp).
    pub timestamp: u32,
    /// The longest duration seen, in telephone-event clock units.
    pub duration: u16,
    /// Power level in -dBm0 of the last packet seen.
    pub volume: u8,
    /// Whether an end packet was seen; `false` when the press is reported because every end
    /// packet was lost and another press started (or the caller flushed).
    pub ended: bool,
}

/// The press being received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Current {
    press: DtmfPress,
    reported: bool,
}

/// Turns a stream of telephone-event packets into one [`DtmfPress`] per key press.
#[derive(Clone, Debug, Default)]
pub struct DtmfDetector {
    current: Option<Current>,
    /// Start timestamps of recent presses, oldest overwritten first.
    finished: [Option<u32>; REMEMBERED_PRESSES],
    next_slot: usize,
}

impl DtmfDetector {
    /// A detector that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one telephone-event packet (its RTP timestamp and payload) and returns the presses
    /// it completes: usually none; one on the first end packet of a press; two only when a press
    /// whose end packets were all lost is followed by a press seen only by its end packets.
    ///
    /// Events that are not DTMF keys (flash, tones) are ignored.
    pub fn push(
        &mut self,
        rtp_timestamp: u32,
        payload: &[u8],
    ) -> Result<Vec<DtmfPress>, PhoneMediaError> {
        let event = TelephoneEvent::parse(payload)?;
        let Some(digit) = event.digit() else {
            return Ok(Vec::new());
        };
        let mut presses = Vec::new();
        match &mut self.current {
            Some(current) if current.press.timestamp == rtp_timestamp => {
                current.press.duration = current.press.duration.max(event.duration);
                current.press.volume = event.volume;
                if event.end && !current.reported {
                    current.reported = true;
                    current.press.ended = true;
                    presses.push(current.press);
                }
                return Ok(presses);
            }
            _ => {}
        }
        if self.finished.contains(&Some(rtp_timestamp)) {
            // A straggler of a press already done with.
            return Ok(presses);
        }
        if let Some(previous) = self.current.take() {
            if !previous.reported {
                presses.push(previous.press);
            }
            self.remember(previous.press.timestamp);
        }
        let press = DtmfPress {
            digit,
            timestamp: rtp_timestamp,
            duration: event.duration,
            volume: event.volume,
            ended: event.end,
        };
        if event.end {
            presses.push(press);
        }
        self.current = Some(Current {
            press,
            reported: event.end,
        });
        Ok(presses)
    }

    /// Reports the press in progress, if it has not been reported, as if it had ended now: for
    /// when the caller decides its end packets are lost (no telephone event for a while, or the
    /// call ends).
    pub fn flush(&mut self) -> Option<DtmfPress> {
        let current = self.current.as_mut()?;
        if current.reported {
            return None;
        }
        current.reported = true;
        Some(current.press)
    }

    fn remember(&mut self, timestamp: u32) {
        self.finished[self.next_slot] = Some(timestamp);
        self.next_slot = (self.next_slot + 1) % REMEMBERED_PRESSES;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packets a phone sends for one press (as SIPp's and baresip's RFC 4733 senders do):
    /// updates every 20 ms (160 units at 8 kHz), then the end three times.
    fn press(event: u8, start: u32, updates: u16) -> Vec<(u32, [u8; 4])> {
        let mut packets: Vec<_> = (1..=updates)
            .map(|n| {
                let packet = TelephoneEvent {
                    event,
                    end: false,
                    volume: 10,
                    duration: 160 * n,
                };
                (start, packet.to_bytes())
            })
            .collect();
        let end = TelephoneEvent {
            event,
            end: true,
            volume: 10,
            duration: 160 * (updates + 1),
        };
        packets.extend(std::iter::repeat_n((start, end.to_bytes()), 3));
        packets
    }

    fn run(detector: &mut DtmfDetector, packets: &[(u32, [u8; 4])]) -> Vec<DtmfPress> {
        packets
            .iter()
            .flat_map(|(ts, payload)| detector.push(*ts, payload).expect("valid event"))
            .collect()
    }

    #[test]
    fn digits_and_codes() {
        let keys: String = (0..16).filter_map(event_digit).collect();
        assert_eq!(keys, "0123456789*#ABCD");
        assert_eq!(event_digit(16), None);
        for (code, key) in keys.chars().enumerate() {
            assert_eq!(digit_event(key), Some(code as u8));
        }
        assert_eq!(digit_event('d'), Some(15));
        assert_eq!(digit_event('x'), None);
    }

    #[test]
    fn payload_parse_and_write() {
        // Key 5, end bit, reserved bit set (ignored), volume 10, duration 800.
        let event = TelephoneEvent::parse(&[5, 0x80 | 0x40 | 10, 0x03, 0x20]).expect("valid");
        assert_eq!(
            event,
            TelephoneEvent {
                event: 5,
                end: true,
                volume: 10,
                duration: 800
            }
        );
        assert_eq!(event.digit(), Some('5'));
        assert_eq!(event.to_bytes(), [5, 0x8A, 0x03, 0x20]);
        let error = TelephoneEvent::parse(&[5, 0, 0]).expect_err("short");
        assert_eq!(error.category(), "malformed_dtmf");
        assert!(TelephoneEvent::parse(&[11, 0, 0, 0, 0xFF]).is_ok());
    }

    #[test]
    fn a_realistic_sequence_gives_one_event_per_press() {
        let mut detector = DtmfDetector::new();
        let mut packets = press(1, 8000, 5);
        packets.extend(press(2, 9600, 4));
        packets.extend(press(10, 11_200, 6));
        // The same key twice in a row is two presses.
        packets.extend(press(10, 12_800, 3));
        let presses = run(&mut detector, &packets);
        let keys: String = presses.iter().map(|p| p.digit).collect();
        assert_eq!(keys, "12**");
        assert_eq!(presses[0].duration, 960);
        assert_eq!(presses[0].timestamp, 8000);
        assert!(presses.iter().all(|p| p.ended && p.volume == 10));
        assert_eq!(detector.flush(), None);
    }

    #[test]
    fn lost_end_packets_are_reported_when_the_next_press_starts() {
        let mut detector = DtmfDetector::new();
        let mut first = press(7, 1000, 4);
        first.truncate(4); // all three end packets lost
        let presses = run(&mut detector, &first);
        assert!(presses.is_empty());
        let presses = run(&mut detector, &press(8, 5000, 2));
        let keys: String = presses.iter().map(|p| p.digit).collect();
        assert_eq!(keys, "78");
        assert!(!presses[0].ended && presses[1].ended);
        assert_eq!(presses[0].duration, 640);

        // Only the end packets of a press seen, after a press with no end at all: both at once.
        let mut detector = DtmfDetector::new();
        run(&mut detector, &press(3, 100, 2)[..2]);
        let end_only = &press(4, 900, 2)[2..];
        let presses = detector.push(end_only[0].0, &end_only[0].1).expect("valid");
        assert_eq!(presses.iter().map(|p| p.digit).collect::<String>(), "34");
    }

    #[test]
    fn stragglers_and_flush() {
        let mut detector = DtmfDetector::new();
        let first = press(0, 400, 3);
        run(&mut detector, &first);
        run(&mut detector, &press(9, 2000, 3)[..1]);
        // A late redundant end packet of the first press, after the second started.
        assert!(run(&mut detector, &first[3..]).is_empty());
        // The second press never ends: the caller flushes once.
        let flushed = detector.flush().expect("press in progress");
        assert_eq!((flushed.digit, flushed.ended), ('9', false));
        assert_eq!(detector.flush(), None);
        // Its own late end packets do not report it again.
        assert!(run(&mut detector, &press(9, 2000, 3)).is_empty());
        // Non-DTMF events (16 = flash) are ignored.
        assert!(
            detector
                .push(3000, &[16, 0x80, 0, 160])
                .expect("valid")
                .is_empty()
        );
    }
}
