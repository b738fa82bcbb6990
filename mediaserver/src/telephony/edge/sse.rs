//! A server-sent events reader for the bridge's job stream (the `text/event-stream` format of
//! the HTML standard): bytes in, whole events out.
//!
//! Written here because it is thirty lines and pure: none of the crates already in the tree reads
//! SSE, and the stream's IO (timeouts, reconnects) is the bridge's own business. It handles
//! chunks split anywhere (even inside a UTF-8 character), `\n`, `\r\n` and `\r` line ends,
//! comments (`:` lines, the server's keep-alives), and several `data:` lines per event; an event
//! larger than [`MAX_EVENT_BYTES`] is an error, never unbounded memory.

/// The largest event accepted (a job is a few hundred bytes).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` name (`message` when none was given).
    pub name: String,
    /// Its `data:` lines, joined by `\n`.
    pub data: String,
}

/// Why the stream cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// An event grew past [`MAX_EVENT_BYTES`].
    #[error("an event is larger than {MAX_EVENT_BYTES} bytes")]
    TooLarge,
    /// The bytes are not UTF-8.
    #[error("the stream is not UTF-8")]
    NotUtf8,
}

/// The reader's state between chunks.
#[derive(Debug, Default)]
pub struct SseReader {
    /// Bytes not yet forming a whole line.
    pending: Vec<u8>,
    name: Option<String>,
    data: Option<String>,
    /// A `\r` ended the last chunk: a `\n` starting the next one belongs to it.
    after_cr: bool,
}

impl SseReader {
    /// A reader at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed a chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        for &byte in chunk {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.pending);
                    let line = String::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
                    if let Some(event) = self.line(&line)? {
                        events.push(event);
                    }
                }
                _ => {
                    self.pending.push(byte);
                    if self.pending.len() > MAX_EVENT_BYTES {
                        return Err(SseError::TooLarge);
                    }
                }
            }
        }
        Ok(events)
    }

    fn line(&mut self, line: &str) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            // The blank line dispatches the event (one without data is dropped, per the format).
            let name = self.name.take();
            return Ok(self.data.take().map(|data| SseEvent {
                name: name.unwrap_or_else(|| "message".to_owned()),
                data,
            }));
        }
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => {
                let data = match self.data.as_mut() {
                    Some(data) => {
                        data.push('\n');
                        data
                    }
                    None => self.data.insert(String::new()),
                };
                data.push_str(value);
                if data.len() > MAX_EVENT_BYTES {
                    return Err(SseError::TooLarge);
                }
            }
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(reader: &mut SseReader, chunks: &[&[u8]]) -> Vec<SseEvent> {
        chunks
            .iter()
            .flat_map(|c| reader.push(c).unwrap())
            .collect()
    }

    #[test]
    fn events_comments_and_line_ends() {
        let mut r = SseReader::new();
        let events = all(
            &mut r,
            &[
                b": keep-alive\n\nevent: hello\ndata: {\"a\":1}\n\n",
                b"event: call\r\ndata:x\r\n\r\n",
            ],
        );
        assert_eq!(
            events,
            vec![
                SseEvent {
                    name: "hello".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    name: "call".into(),
                    data: "x".into()
                }
            ]
        );
        // An event without data is dropped; one without a name is a `message`.
        assert_eq!(
            all(&mut r, &[b"event: lonely\n\ndata: d\n\n"])[0].name,
            "message"
        );
        // Several data lines are one event's lines.
        assert_eq!(all(&mut r, &[b"data: a\ndata: b\n\n"])[0].data, "a\nb");
    }

    #[test]
    fn oversized_events_are_refused() {
        let mut r = SseReader::new();
        let big = vec![b'a'; MAX_EVENT_BYTES + 1];
        assert_eq!(r.push(&big), Err(SseError::TooLarge));
        assert_eq!(
            SseReader::new().push(b"data: \xff\n"),
            Err(SseError::NotUtf8)
        );
    }

    proptest! {
        /// However the stream is cut into chunks, the same events come out.
        #[test]
        fn chunking_never_changes_the_events(cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let stream = "event: hello\ndata: {\"bridgeId\":1}\n\n: ping\n\nevent: call\r\ndata: é\r\n\r\nevent: hangup\rdata: 3\r\r";
            let bytes = stream.as_bytes();
            let whole = SseReader::new().push(bytes).unwrap();
            prop_assert_eq!(whole.len(), 3);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut reader = SseReader::new();
            let mut got = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                got.extend(reader.push(&bytes[at..cut]).unwrap());
                at = cut;
            }
            prop_assert_eq!(got, whole);
        }

        /// Arbitrary bytes give events or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SseReader::new().push(&bytes);
        }
    }
}
