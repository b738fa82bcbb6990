//! Call me (placeholder doc)
pub mod media;
