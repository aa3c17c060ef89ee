//! Server-sent events as the Durable Streams server sends them: frames, and what they mean.

use super::Progress;

/// One server-sent event: its type (`message` when absent) and its data lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SseFrame {
    pub(super) event: String,
    pub(super) data: String,
}

/// Incremental `text/event-stream` parser (WHATWG): feed it bytes as they arrive, get the
/// complete events. Lines end with CRLF, LF or CR; `:` lines are comments; `id` and `retry` are
/// not needed here and ignored; an event with no data is not dispatched.
#[derive(Debug, Default)]
pub(super) struct SseDecoder {
    line: Vec<u8>,
    /// The last byte seen was a CR: a LF right after it ends the same line.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    pub(super) fn push(&mut self, mut bytes: &[u8]) -> Vec<SseFrame> {
        let mut frames = Vec::new();
        while let Some(&first) = bytes.first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.line.extend_from_slice(&bytes[..end]);
                    self.after_cr = bytes[end] == b'\r';
                    bytes = &bytes[end + 1..];
                    self.end_line(&mut frames);
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    break;
                }
            }
        }
        frames
    }

    pub(super) fn end_line(&mut self, frames: &mut Vec<SseFrame>) {
        let line = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(&line);
        let line = line.strip_prefix('\u{feff}').unwrap_or(&line);
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            if std::mem::take(&mut self.has_data) {
                frames.push(SseFrame {
                    event: if event.is_empty() {
                        "message".to_owned()
                    } else {
                        event
                    },
                    data,
                });
            }
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // comments (empty field), id, retry, unknown fields
        }
    }
}

/// What a Durable Streams SSE event means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SseEvent {
    /// A JSON array of events.
    Data(String),
    /// Where the preceding data ends.
    Control(Progress),
    Other,
}

pub(super) fn interpret(frame: &SseFrame) -> Result<SseEvent, String> {
    match frame.event.as_str() {
        "data" => Ok(SseEvent::Data(frame.data.clone())),
        "control" => serde_json::from_str(&frame.data)
            .map(SseEvent::Control)
            .map_err(|e| format!("an SSE control event without streamNextOffset: {e}")),
        _ => Ok(SseEvent::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &str) -> Vec<(String, String)> {
        SseDecoder::default()
            .push(input.as_bytes())
            .into_iter()
            .map(|f| (f.event, f.data))
            .collect()
    }

    fn pair(event: &str, data: &str) -> (String, String) {
        (event.to_owned(), data.to_owned())
    }

    #[test]
    fn sse_frames_as_the_server_sends_them() {
        let input = "event: data\ndata:[{\"a\":1},{\"b\":\"x\\ny\"}]\n\n\
                     event: control\ndata:{\"streamNextOffset\":\"0_29\",\"upToDate\":true}\n\n";
        assert_eq!(
            frames(input),
            [
                pair("data", "[{\"a\":1},{\"b\":\"x\\ny\"}]"),
                pair(
                    "control",
                    "{\"streamNextOffset\":\"0_29\",\"upToDate\":true}"
                ),
            ]
        );
    }

    #[test]
    fn sse_line_endings_comments_and_multi_line_data() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            // The protocol's example: a JSON array across several data lines.
            (
                "event: data\ndata: [\ndata: {\"k\":\"v\"},\ndata: {\"k\":\"w\"}\ndata: ]\n\n",
                &[("data", "[\n{\"k\":\"v\"},\n{\"k\":\"w\"}\n]")],
            ),
            ("event: data\r\ndata: 1\r\n\r\n", &[("data", "1")]),
            ("event: data\rdata: 1\r\r", &[("data", "1")]),
            (": keep-alive\n\nevent: x\ndata\n\n", &[("x", "")]),
            ("data:  two spaces\n\n", &[("message", " two spaces")]),
            ("id: 7\nretry: 10\nevent: control\n\n", &[]),
            ("event: data\ndata: incomplete\n", &[]),
            ("\u{feff}event: data\ndata: 1\n\n", &[("data", "1")]),
        ];
        for (input, expected) in cases {
            let expected: Vec<_> = expected.iter().map(|(e, d)| pair(e, d)).collect();
            assert_eq!(frames(input), expected, "{input:?}");
        }
    }

    #[test]
    fn sse_input_split_anywhere_gives_the_same_frames() {
        let input = "event: data\r\ndata:[1,\r\ndata:2]\r\n\r\nevent: control\rdata:{}\r\r:c\n\n";
        let whole = frames(input);
        assert_eq!(whole.len(), 2);
        for split in 0..=input.len() {
            let mut decoder = SseDecoder::default();
            let mut got = decoder.push(&input.as_bytes()[..split]);
            got.extend(decoder.push(&input.as_bytes()[split..]));
            let got: Vec<_> = got.into_iter().map(|f| (f.event, f.data)).collect();
            assert_eq!(got, whole, "split at {split}");
        }
    }

    #[test]
    fn sse_events_mean_data_control_or_nothing() {
        let frame = |event: &str, data: &str| SseFrame {
            event: event.into(),
            data: data.into(),
        };
        assert_eq!(
            interpret(&frame("data", "[1]")),
            Ok(SseEvent::Data("[1]".into()))
        );
        assert_eq!(
            interpret(&frame(
                "control",
                r#"{"streamNextOffset":"a_1","streamCursor":"9","upToDate":true,"streamClosed":true}"#
            )),
            Ok(SseEvent::Control(Progress {
                next_offset: "a_1".into(),
                cursor: Some("9".into()),
                up_to_date: true,
                closed: true,
            }))
        );
        assert_eq!(
            interpret(&frame("control", r#"{"streamNextOffset":"a_2"}"#)),
            Ok(SseEvent::Control(Progress {
                next_offset: "a_2".into(),
                cursor: None,
                up_to_date: false,
                closed: false,
            }))
        );
        assert!(interpret(&frame("control", r#"{"upToDate":true}"#)).is_err());
        assert_eq!(interpret(&frame("message", "hi")), Ok(SseEvent::Other));
    }
}
