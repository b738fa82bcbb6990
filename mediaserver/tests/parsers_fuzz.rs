//! Property tests ("fuzzing" on stable Rust) of the network- and user-facing parsers this crate
//! owns and that are not covered next to their code: join tokens, the config file, the mesh plan,
//! and whole SDP offers through a live media port. The property is always the same: any input gets
//! an `Ok` or a clear `Err`, never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_crds::MeshPlan;
use chorus_mediaserver::config::Layer;
use chorus_mediaserver::endpoint::MediaPort;
use chorus_mediaserver::token::TokenKey;
use proptest::prelude::*;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn tokens(text in ".{0,400}", dots in proptest::collection::vec("[A-Za-z0-9_-]{0,60}", 0..5)) {
        let key = TokenKey::new(KEY).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        prop_assert!(key.verify(&text, "c", "r", now).is_err());
        prop_assert!(key.verify(&dots.join("."), "c", "r", now).is_err());
    }

    #[test]
    fn tokens_with_a_flipped_byte(pos in 0usize..400, bit in 0u8..8) {
        let key = TokenKey::new(KEY).unwrap();
        let now = SystemTime::now();
        let token = key.mint("c", "r", "id", Duration::from_secs(60), now);
        let mut bytes = token.into_bytes();
        let i = pos % bytes.len();
        bytes[i] ^= 1 << bit;
        if let Ok(text) = String::from_utf8(bytes) {
            // A changed token verifies only if the change is invisible to base64url decoding.
            if let Ok(claims) = key.verify(&text, "c", "r", now) {
                prop_assert_eq!(claims.sub, "id");
            }
        }
    }

    #[test]
    fn config_files(text in "[ -~\n]{0,300}") {
        let _ = toml::from_str::<Layer>(&text);
    }

    #[test]
    fn mesh_plans(text in ".{0,600}") {
        let _ = MeshPlan::from_json(&text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whole offers through a running port: malformed ones are refused with an error.
    #[test]
    fn offers_through_a_port(text in "(v=0\r\n)?[ -~\r\n]{0,800}") {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let port = MediaPort::start(socket, [127, 0, 0, 1].into(), stop.clone()).unwrap();
            let result = port.accept(&text).await;
            prop_assert!(result.is_err(), "random text accepted as an offer");
            stop.cancel();
            Ok(())
        })?;
    }
}
