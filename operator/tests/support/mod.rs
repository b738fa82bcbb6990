//! What the operator's test files share.

/// Mixing settings as a flag or variable could name them, lower case without `-` or `_`.
const MIXING_SETTINGS: [&str; 5] = [
    "topspeakers",
    "framems",
    "jitter",
    "rankinterval",
    "extracandidates",
];

/// Whether a flag or variable name (`--top-speakers`, `CHORUS_FRAME_MS`, ...) names a mixing setting.
pub fn names_mixing(name: &str) -> bool {
    let folded: String = name
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .collect::<String>()
        .to_ascii_lowercase();
    MIXING_SETTINGS.iter().any(|m| folded.contains(m))
}
