//! Synthetic talkers for a local conference: who says what, in which voice, on which server.
//!
//! Pure: the runtime asks these functions and spawns `chorus-bot` with the answers. Each bot gets a
//! distinct sentence, a distinct espeak-ng voice (for the first [`distinct_voices`] bots) and a level
//! 3 dB below the previous one, so a listener can tell them apart and the ranking has a clear order.
//! The first five match `scripts/demo`.

/// Sentences of the first bots; later bots get a numbered sentence.
const LINES: [&str; 5] = [
    "Good morning everyone. Welcome to the Chorus demo. Everyone hears the same mix of the loudest speakers.",
    "Hello from the second talker. When I speak louder than the others, I take the place of the quietest one.",
    "This is the third voice. Mute yourself and watch the speaker list change.",
    "A fourth voice joins. Only the top speakers are mixed, so listeners cost no extra encoding.",
    "Fifth talker here. Try joining from another browser tab.",
];

/// espeak-ng languages and variants; the first five pairs are the demo script's voices.
const VOICES: [&str; 26] = [
    "en-us", "en-gb+f3", "en-us+m3", "en-gb+f4", "en-us+f2", "en-gb+m4", "en-us+f4", "en-gb+m2",
    "en-us+m1", "en-gb+f1", "en-us+m5", "en-gb+f5", "en-us+m6", "en-gb", "en-us+f3", "en-gb+m3",
    "en-us+f1", "en-gb+m1", "en-us+m2", "en-gb+f2", "en-us+m4", "en-gb+m5", "en-us+f5", "en-gb+m6",
    "en-us+m7", "en-gb+m7",
];

/// How many bots get a voice of their own; later ones reuse voices (their sentences still differ).
pub fn distinct_voices() -> usize {
    VOICES.len()
}

/// What bot `j` says.
pub fn sentence(j: usize) -> String {
    match LINES.get(j) {
        Some(line) => (*line).to_owned(),
        None => format!(
            "Talker number {} here. I am quieter than the ones before me, so I am rarely mixed.",
            j + 1
        ),
    }
}

/// The espeak-ng voice of bot `j`.
pub fn voice(j: usize) -> &'static str {
    VOICES[j % VOICES.len()]
}

/// The level of bot `j` in dBFS: -18, -21, -24, ...
pub fn level_dbfs(j: usize) -> i64 {
    -(18 + 3 * i64::try_from(j).unwrap_or(i64::MAX / 4))
}

/// The identity in bot `j`'s join token.
pub fn identity(j: usize) -> String {
    format!("bot-{}", j + 1)
}

/// Which server bot `j` joins: regions first (bot j goes to region `j % regions`), then round-robin
/// over that region's servers. `servers_per_region` lists, per region that has servers, the
/// number of servers; the answer is (index into that list, server index within the region).
pub fn placement(j: usize, servers_per_region: &[usize]) -> Option<(usize, usize)> {
    let regions = servers_per_region.len();
    if regions == 0 {
        return None;
    }
    let region = j % regions;
    let count = servers_per_region[region];
    if count == 0 {
        return None;
    }
    Some((region, (j / regions) % count))
}
