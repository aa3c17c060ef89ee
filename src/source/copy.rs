//! Parsing rows of `COPY … TO STDOUT` (text format): tab-separated fields, `\N` for NULL,
//! backslash escapes. The values are the types' output functions, exactly as pgoutput's text
//! format sends them, so the same JSON conversion applies.

/// A row could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("malformed COPY row: {0}")]
pub struct CopyError(&'static str);

/// Split one line (without its trailing newline) into fields; `None` is NULL.
pub fn parse_line(line: &[u8]) -> Result<Vec<Option<String>>, CopyError> {
    let mut fields = Vec::new();
    for raw in line.split(|&b| b == b'\t') {
        if raw == b"\\N" {
            fields.push(None);
            continue;
        }
        fields.push(Some(unescape(raw)?));
    }
    Ok(fields)
}

fn unescape(raw: &[u8]) -> Result<String, CopyError> {
    if !raw.contains(&b'\\') {
        return String::from_utf8(raw.to_vec()).map_err(|_| CopyError("not UTF-8"));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(&c) = raw.get(i) else {
            return Err(CopyError("backslash at the end of a field"));
        };
        i += 1;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).map_err(|_| CopyError("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_nulls_and_escapes() {
        let cases: &[(&[u8], Vec<Option<&str>>)] = &[
            (b"1\talice\t\\N", vec![Some("1"), Some("alice"), None]),
            (b"a\\tb\\nc\\\\d", vec![Some("a\tb\nc\\d")]),
            (b"\\x41\\101\\b", vec![Some("AA\u{8}")]),
            (b"", vec![Some("")]),
            (b"\t", vec![Some(""), Some("")]),
            ("héllo 🦀".as_bytes(), vec![Some("héllo 🦀")]),
            (b"\\\\N", vec![Some("\\N")]),
            (b"{\"a\\\\\"b\"}", vec![Some("{\"a\\\"b\"}")]),
        ];
        for (line, want) in cases {
            let got = parse_line(line).unwrap();
            let want: Vec<Option<String>> = want.iter().map(|f| f.map(str::to_owned)).collect();
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn malformed_rows_are_errors() {
        assert!(parse_line(b"abc\\").is_err());
        assert!(parse_line(b"\xff").is_err());
    }
}
