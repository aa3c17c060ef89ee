//! Stream paths from user ids: the only way a user id becomes part of a URL.
//!
//! Invariant: a path built here addresses exactly the stream of that user id. The template is
//! checked once at start-up (absolute, one `{user_id}`, only URL path characters, no dot
//! segments); an id is refused when it could leave its path segment (`/`, `\`, `.`, `..`, control
//! characters) and is otherwise percent-encoded byte by byte (everything but `A-Z a-z 0-9 - . _ ~`),
//! so `?`, `#`, `%` and spaces cannot change the URL's structure either.

use std::fmt;
use std::sync::Arc;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

const PLACEHOLDER: &str = "{user_id}";

/// Bytes of a user id that are percent-encoded: all but RFC 3986 "unreserved".
const ID_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A validated stream path template such as `/v1/stream/user/{user_id}/data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    prefix: Box<str>,
    suffix: Box<str>,
    max_user_id_len: usize,
}

/// The stream path template is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathTemplateError {
    #[error("stream path template must start with '/', e.g. /v1/stream/user/{{user_id}}/data")]
    NotAbsolute,
    #[error("stream path template must contain {{user_id}} exactly once (found {0})")]
    Placeholder(usize),
    #[error(
        "stream path template contains {0:?}, which is not allowed in a URL path: percent-encode it"
    )]
    InvalidCharacter(char),
    #[error("stream path template contains a malformed percent escape (expected %XX)")]
    BadEscape,
    #[error("stream path template contains a '.' or '..' segment, which URL normalization removes")]
    DotSegment,
    #[error("the maximum user id length must be at least 1 byte")]
    ZeroMaxLen,
}

/// A user id that cannot be used in a stream path. The id itself is not included: it is row data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("user id refused for a stream path: {reason}")]
pub struct InvalidUserId {
    pub reason: InvalidUserIdReason,
}

/// Why a user id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUserIdReason {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} bytes long, more than the maximum of {max}")]
    TooLong { len: usize, max: usize },
    #[error("it contains a control character")]
    ControlCharacter,
    #[error("it contains '/'")]
    Slash,
    #[error("it contains '\\'")]
    Backslash,
    #[error("it is '.' or contains '..'")]
    DotSegment,
}

impl PathTemplate {
    /// `template` must contain `{user_id}` exactly once and start with '/'; error otherwise.
    pub fn parse(template: &str, max_user_id_len: usize) -> Result<Self, PathTemplateError> {
        if max_user_id_len == 0 {
            return Err(PathTemplateError::ZeroMaxLen);
        }
        if !template.starts_with('/') {
            return Err(PathTemplateError::NotAbsolute);
        }
        let count = template.matches(PLACEHOLDER).count();
        let (prefix, suffix) = match template.split_once(PLACEHOLDER) {
            Some(parts) if count == 1 => parts,
            _ => return Err(PathTemplateError::Placeholder(count)),
        };
        for text in [prefix, suffix] {
            check_static(text)?;
        }
        // Segments made only of template text; a segment holding the id cannot become a dot
        // segment because ids "." and ".." are refused.
        let whole_static = prefix
            .rsplit_once('/')
            .map_or("", |(s, _)| s)
            .split('/')
            .chain(suffix.split_once('/').map_or("", |(_, s)| s).split('/'));
        for segment in whole_static {
            let decoded = percent_decode_str(segment).collect::<Vec<u8>>();
            if decoded == b"." || decoded == b".." {
                return Err(PathTemplateError::DotSegment);
            }
        }
        Ok(Self {
            prefix: prefix.into(),
            suffix: suffix.into(),
            max_user_id_len,
        })
    }

    /// Percent-encodes the id into the template. Refuses ids that are empty, longer than
    /// `max_user_id_len` bytes, contain control characters, '/', '\\', or are "." / ".." or
    /// contain "..": such an id can never address another user's stream.
    pub fn path_for(&self, user_id: &str) -> Result<Arc<str>, InvalidUserId> {
        let refuse = |reason| Err(InvalidUserId { reason });
        if user_id.is_empty() {
            return refuse(InvalidUserIdReason::Empty);
        }
        if user_id.len() > self.max_user_id_len {
            return refuse(InvalidUserIdReason::TooLong {
                len: user_id.len(),
                max: self.max_user_id_len,
            });
        }
        if user_id.chars().any(char::is_control) {
            return refuse(InvalidUserIdReason::ControlCharacter);
        }
        if user_id.contains('/') {
            return refuse(InvalidUserIdReason::Slash);
        }
        if user_id.contains('\\') {
            return refuse(InvalidUserIdReason::Backslash);
        }
        if user_id == "." || user_id.contains("..") {
            return refuse(InvalidUserIdReason::DotSegment);
        }
        let mut path =
            String::with_capacity(self.prefix.len() + user_id.len() * 3 + self.suffix.len());
        path.push_str(&self.prefix);
        path.extend(utf8_percent_encode(user_id, ID_ENCODE));
        path.push_str(&self.suffix);
        Ok(path.into())
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{PLACEHOLDER}{}", self.prefix, self.suffix)
    }
}

/// Template text may hold only URL path characters (RFC 3986 `pchar` and '/'), escapes as %XX.
fn check_static(text: &str) -> Result<(), PathTemplateError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(PathTemplateError::BadEscape)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(PathTemplateError::BadEscape);
            }
            i += 3;
            continue;
        }
        let allowed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b);
        if !allowed {
            let c = text[i..].chars().next().unwrap_or('\u{fffd}');
            return Err(PathTemplateError::InvalidCharacter(c));
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> PathTemplate {
        PathTemplate::parse("/v1/stream/user/{user_id}/data", 64).unwrap()
    }

    #[test]
    fn encodes_ids_into_one_segment() {
        let t = template();
        let cases = [
            ("alice", "/v1/stream/user/alice/data"),
            ("a-b_c.d~e", "/v1/stream/user/a-b_c.d~e/data"),
            ("john doe", "/v1/stream/user/john%20doe/data"),
            ("100%", "/v1/stream/user/100%25/data"),
            ("a?b=c", "/v1/stream/user/a%3Fb%3Dc/data"),
            ("a#frag", "/v1/stream/user/a%23frag/data"),
            ("élise", "/v1/stream/user/%C3%A9lise/data"),
            ("用户", "/v1/stream/user/%E7%94%A8%E6%88%B7/data"),
            ("a+b&c;d", "/v1/stream/user/a%2Bb%26c%3Bd/data"),
            (".hidden", "/v1/stream/user/.hidden/data"),
            ("a.b", "/v1/stream/user/a.b/data"),
            ("%2e%2e", "/v1/stream/user/%252e%252e/data"),
        ];
        for (id, expected) in cases {
            assert_eq!(&*t.path_for(id).unwrap(), expected, "{id:?}");
        }
    }

    #[test]
    fn encoded_paths_survive_url_parsing_unchanged() {
        let t = template();
        for id in ["john doe", "100%", "a?b#c", "élise", "a.b", "%2e%2e", "~x"] {
            let path = t.path_for(id).unwrap();
            let url = url::Url::parse(&format!("http://h{path}")).unwrap();
            assert_eq!(url.path(), &*path, "{id:?}");
            assert_eq!(url.query(), None);
            assert_eq!(url.fragment(), None);
        }
    }

    #[test]
    fn refuses_ids_that_could_escape_their_segment() {
        use InvalidUserIdReason::*;
        let t = PathTemplate::parse("/u/{user_id}", 8).unwrap();
        let cases = [
            ("", Empty),
            ("123456789", TooLong { len: 9, max: 8 }),
            ("ééééé", TooLong { len: 10, max: 8 }),
            ("a\nb", ControlCharacter),
            ("a\0", ControlCharacter),
            ("\u{7f}", ControlCharacter),
            ("\u{85}", ControlCharacter),
            ("a/b", Slash),
            ("/", Slash),
            ("a\\b", Backslash),
            (".", DotSegment),
            ("..", DotSegment),
            ("a..b", DotSegment),
            ("...", DotSegment),
        ];
        for (id, reason) in cases {
            assert_eq!(t.path_for(id), Err(InvalidUserId { reason }), "{id:?}");
        }
        assert_eq!(&*t.path_for("12345678").unwrap(), "/u/12345678");
    }

    #[test]
    fn template_validation() {
        use PathTemplateError::*;
        let cases = [
            ("v1/{user_id}", NotAbsolute),
            ("", NotAbsolute),
            ("/v1/user", Placeholder(0)),
            ("/v1/{user_id}/{user_id}", Placeholder(2)),
            ("/v1/{userid}", Placeholder(0)),
            ("/v1/{user_id}?x=1", InvalidCharacter('?')),
            ("/v1/{user_id}#f", InvalidCharacter('#')),
            ("/v 1/{user_id}", InvalidCharacter(' ')),
            ("/vé/{user_id}", InvalidCharacter('é')),
            ("/v1/{{user_id}}", InvalidCharacter('{')),
            ("/v1\\{user_id}", InvalidCharacter('\\')),
            ("/v1/%zz/{user_id}", BadEscape),
            ("/v1/{user_id}/%2", BadEscape),
            ("/v1/../{user_id}", DotSegment),
            ("/v1/./{user_id}", DotSegment),
            ("/v1/{user_id}/..", DotSegment),
            ("/v1/%2E%2e/{user_id}", DotSegment),
        ];
        for (text, expected) in cases {
            assert_eq!(PathTemplate::parse(text, 64), Err(expected), "{text:?}");
        }
        assert_eq!(PathTemplate::parse("/{user_id}", 0), Err(ZeroMaxLen));
        for ok in [
            "/{user_id}",
            "/a/{user_id}.json",
            "/s/u-{user_id}/data",
            "/a%20b/{user_id}/",
        ] {
            let t = PathTemplate::parse(ok, 64).unwrap();
            assert_eq!(t.to_string(), ok);
        }
    }
}
