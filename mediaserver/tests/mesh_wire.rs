//! Property tests of the mesh's network-facing parsers: random and mutated bytes never panic any
//! decoder, and every valid value round-trips.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use bytes::Bytes;
use chorus_mediaserver::media::AudioLevel;
use chorus_mediaserver::media::{Candidate, StreamId};
use chorus_mediaserver::mesh::transport::{Frame, MAX_FRAME};
use chorus_mediaserver::mesh::wire::{
    MAX_CONTROL_BYTES, MAX_DATAGRAM, MAX_GLOBAL_LIST, MAX_GLOBAL_MARGIN, MAX_IDENTITY,
    MAX_LOCAL_CANDIDATES, MAX_OPUS_PAYLOAD,
};
use chorus_mediaserver::mesh::{ControlMessage, MediaDatagram, StreamKey};
use proptest::prelude::*;

fn room() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn server() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9.-]{0,40}"
}

fn candidate() -> impl Strategy<Value = Candidate> {
    (
        any::<u64>(),
        -127.0f32..=0.0f32,
        any::<bool>(),
        proptest::option::of("\\PC{0,40}"),
    )
        .prop_map(|(stream, importance, voice, identity)| Candidate {
            stream: StreamId(stream),
            importance,
            voice,
            identity,
        })
}

fn key() -> impl Strategy<Value = StreamKey> {
    (server(), any::<u64>()).prop_map(|(s, i)| StreamKey::new(s, i))
}

fn control() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
            |(sent_at_us, incarnation, generation)| {
                ControlMessage::Heartbeat {
                    sent_at_us,
                    incarnation,
                    generation,
                }
            }
        ),
        prop::collection::vec(room(), 0..20)
            .prop_map(|rooms| ControlMessage::RoomMembership { rooms }),
        (
            room(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(candidate(), 0..=MAX_LOCAL_CANDIDATES),
            any::<u64>()
        )
            .prop_map(|(room, seq, epoch, candidates, late_us)| {
                ControlMessage::LocalTopList {
                    room,
                    seq,
                    epoch,
                    candidates,
                    late_us,
                }
            }),
        (
            room(),
            any::<u64>(),
            server(),
            prop::collection::vec(key(), 0..=MAX_GLOBAL_LIST),
            prop::collection::vec(key(), 0..=MAX_GLOBAL_MARGIN),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(room, epoch, primary, list, margin, named, at_us)| {
                // Names, when present, come one per listed stream.
                let names = if named {
                    list.iter().map(|k| format!("who-{}", k.stream.0)).collect()
                } else {
                    Vec::new()
                };
                ControlMessage::GlobalTopList {
                    room,
                    epoch,
                    primary,
                    list,
                    margin,
                    names,
                    at_us,
                }
            }),
    ]
}

fn datagram() -> impl Strategy<Value = MediaDatagram> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u16>(),
        any::<u32>(),
        prop::option::of((0u8..=127, any::<bool>())),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 1..=MAX_OPUS_PAYLOAD),
        any::<bool>(),
    )
        .prop_map(
            |(room_hash, stream, seq, rtp_timestamp, level, ingress_us, payload, backlog)| {
                MediaDatagram {
                    room_hash,
                    stream: StreamId(stream),
                    seq,
                    rtp_timestamp,
                    level: level.map(|(dbov, voice)| AudioLevel { dbov, voice }),
                    ingress_us,
                    payload: Bytes::from(payload),
                    backlog,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mesh_random_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = ControlMessage::decode(&bytes);
        let _ = MediaDatagram::decode(Bytes::from(bytes.clone()));
        let _ = Frame::decode(&bytes);
        if bytes.len() >= 4 {
            let _ = Frame::length([bytes[0], bytes[1], bytes[2], bytes[3]], MAX_FRAME);
        }
        // With a valid version byte in front, the JSON parser sees the random bytes.
        let mut v = vec![1u8];
        v.extend_from_slice(&bytes);
        let _ = ControlMessage::decode(&v);
    }

    #[test]
    fn mesh_random_json_never_panics(json in "\\{\"t\":\"(hb|rm|lt|gt)\"[ -~]{0,200}") {
        let mut v = vec![1u8];
        v.extend_from_slice(json.as_bytes());
        let _ = ControlMessage::decode(&v);
    }

    #[test]
    fn mesh_control_messages_round_trip(msg in control()) {
        let bytes = msg.encode().unwrap();
        prop_assert!(bytes.len() <= MAX_CONTROL_BYTES);
        prop_assert_eq!(ControlMessage::decode(&bytes).unwrap(), msg.clone());
        let frame = Frame::Control(msg).encode().unwrap();
        let len = Frame::length([frame[0], frame[1], frame[2], frame[3]], MAX_FRAME).unwrap();
        prop_assert_eq!(len, frame.len() - 4);
        prop_assert!(Frame::decode(&frame[4..]).is_ok());
    }

    #[test]
    fn mesh_mutated_control_messages_never_panic(msg in control(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let mut bytes = msg.encode().unwrap();
        let i = at % bytes.len();
        bytes[i] = byte;
        let _ = ControlMessage::decode(&bytes);
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = ControlMessage::decode(&bytes);
    }

    #[test]
    fn mesh_datagrams_round_trip(d in datagram()) {
        let bytes = d.encode().unwrap();
        prop_assert!(bytes.len() <= MAX_DATAGRAM);
        prop_assert_eq!(MediaDatagram::decode(bytes).unwrap(), d);
    }

    #[test]
    fn mesh_mutated_datagrams_never_panic(d in datagram(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let mut bytes = d.encode().unwrap().to_vec();
        let i = at % bytes.len();
        bytes[i] = byte;
        let _ = MediaDatagram::decode(Bytes::from(bytes.clone()));
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = MediaDatagram::decode(Bytes::from(bytes));
    }

    #[test]
    fn mesh_frames_round_trip(id in server(), t in any::<u64>()) {
        for f in [Frame::Hello { server_id: id.clone() }, Frame::Ping(t), Frame::Pong(t)] {
            let bytes = f.encode().unwrap();
            prop_assert_eq!(Frame::decode(&bytes[4..]).unwrap(), f);
        }
    }
}

#[test]
fn mesh_limits_fail_cleanly_with_categories() {
    // Over-long datagram, bad magic, unknown flags, level over 127, empty payload.
    let big = Bytes::from(vec![0xC1u8; MAX_DATAGRAM + 1]);
    assert_eq!(
        MediaDatagram::decode(big).unwrap_err().category(),
        "too_large"
    );
    let mut d = MediaDatagram {
        room_hash: 1,
        stream: StreamId(2),
        seq: 3,
        rtp_timestamp: 4,
        level: None,
        ingress_us: 5,
        payload: Bytes::from_static(b"x"),
        backlog: false,
    }
    .encode()
    .unwrap()
    .to_vec();
    assert_eq!(
        MediaDatagram::decode(Bytes::from(d[..33].to_vec()))
            .unwrap_err()
            .category(),
        "truncated"
    );
    d[0] = 0xC2;
    assert_eq!(
        MediaDatagram::decode(Bytes::from(d.clone()))
            .unwrap_err()
            .category(),
        "version"
    );
    d[0] = 0xC1;
    d[1] = 0x80;
    assert_eq!(
        MediaDatagram::decode(Bytes::from(d.clone()))
            .unwrap_err()
            .category(),
        "invalid"
    );
    d[1] = 0x01;
    d[24] = 200;
    assert_eq!(
        MediaDatagram::decode(Bytes::from(d))
            .unwrap_err()
            .category(),
        "invalid"
    );

    // Control: too large, too many rooms, empty, unknown type, non-finite importance.
    let huge = vec![1u8; MAX_CONTROL_BYTES + 1];
    assert_eq!(
        ControlMessage::decode(&huge).unwrap_err().category(),
        "too_large"
    );
    let rooms = ControlMessage::RoomMembership {
        rooms: vec!["r".into(); 1025],
    };
    assert_eq!(rooms.encode().unwrap_err().category(), "too_large");
    assert_eq!(
        ControlMessage::decode(&[]).unwrap_err().category(),
        "truncated"
    );
    assert_eq!(
        ControlMessage::decode(b"\x01{\"t\":\"zz\"}")
            .unwrap_err()
            .category(),
        "malformed"
    );
    let nan = ControlMessage::LocalTopList {
        room: "r".into(),
        seq: 1,
        epoch: 0,
        candidates: vec![Candidate {
            stream: StreamId(1),
            importance: f32::NAN,
            voice: true,
            identity: None,
        }],
        late_us: 0,
    };
    assert_eq!(nan.encode().unwrap_err().category(), "invalid");
    let long_name = ControlMessage::LocalTopList {
        room: "r".into(),
        seq: 1,
        epoch: 0,
        candidates: vec![Candidate {
            stream: StreamId(1),
            importance: -20.0,
            voice: true,
            identity: Some("x".repeat(MAX_IDENTITY + 1)),
        }],
        late_us: 0,
    };
    assert_eq!(long_name.encode().unwrap_err().category(), "too_large");
    let misaligned = ControlMessage::GlobalTopList {
        room: "r".into(),
        epoch: 1,
        primary: "a".into(),
        list: vec![StreamKey::new("a", 1), StreamKey::new("b", 2)],
        margin: Vec::new(),
        names: vec!["only-one".into()],
        at_us: 0,
    };
    assert_eq!(misaligned.encode().unwrap_err().category(), "invalid");

    // Frames: zero and over-long lengths, unknown kind, bad hello.
    assert_eq!(
        Frame::length([0, 0, 0, 0], MAX_FRAME)
            .unwrap_err()
            .category(),
        "truncated"
    );
    assert_eq!(
        Frame::length([0xFF, 0xFF, 0xFF, 0xFF], MAX_FRAME)
            .unwrap_err()
            .category(),
        "too_large"
    );
    assert_eq!(Frame::decode(&[9]).unwrap_err().category(), "malformed");
    assert_eq!(
        Frame::decode(&[1, 1, b' ']).unwrap_err().category(),
        "invalid"
    );
    assert_eq!(Frame::decode(&[2, 0]).unwrap_err().category(), "malformed");
}
