//! Printing a read's JSON array body: one line per event, as sent or compacted.

/// Appends one line per event of a JSON array `body` (empty body: no events) to `out`: the
/// event as sent when `raw`, else with the whitespace outside strings removed.
pub(super) fn render(body: &[u8], raw: bool, out: &mut String) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    if text.trim().is_empty() {
        return Ok(());
    }
    for event in array_elements(text)? {
        if raw {
            out.push_str(event);
        } else {
            compact_into(event, out);
        }
        out.push('\n');
    }
    Ok(())
}

/// The text of each element of the JSON array `text`, exactly as written (trimmed).
pub(super) fn array_elements(text: &str) -> Result<Vec<&str>, String> {
    serde_json::from_str::<Vec<serde::de::IgnoredAny>>(text)
        .map_err(|e| format!("the body is not a JSON array: {e}"))?;
    // Valid JSON from here on: only nesting and strings need tracking.
    let inner = text.trim();
    let inner = &inner[1..inner.len() - 1];
    let mut elements = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0);
    for (i, b) in inner.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                elements.push(inner[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = inner[start..].trim();
    if !last.is_empty() {
        elements.push(last);
    }
    Ok(elements)
}

/// `json` (valid) without the whitespace outside strings.
pub(super) fn compact_into(json: &str, out: &mut String) {
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_prints_one_line_per_event() {
        let body = br#" [ {"b": 1, "a" : "x , ] \" y"} , [1, [2]] ,"s",
            3.50e1 , null ] "#;
        let mut raw = String::new();
        render(body, true, &mut raw).unwrap();
        assert_eq!(
            raw,
            "{\"b\": 1, \"a\" : \"x , ] \\\" y\"}\n[1, [2]]\n\"s\"\n3.50e1\nnull\n"
        );
        let mut compact = String::new();
        render(body, false, &mut compact).unwrap();
        assert_eq!(
            compact,
            "{\"b\":1,\"a\":\"x , ] \\\" y\"}\n[1,[2]]\n\"s\"\n3.50e1\nnull\n"
        );
        for empty in [&b""[..], b"[]", b" [ ] ", b"\n"] {
            let mut out = String::new();
            render(empty, false, &mut out).unwrap();
            assert_eq!(out, "", "{empty:?}");
        }
        for bad in [&b"{\"a\":1}"[..], b"[1,", b"[1] [2]", b"\xff"] {
            assert!(render(bad, false, &mut String::new()).is_err(), "{bad:?}");
        }
    }
}
