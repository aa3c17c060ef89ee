//! Column values in Postgres text output format → JSON.
//!
//! The replication session is pinned to `DateStyle=ISO, TimeZone=UTC,
//! IntervalStyle=iso_8601, extra_float_digits=3, bytea_output=hex`, so each type prints in one
//! known form. [`TypeRegistry::to_json`] never fails: text it does not recognise becomes a JSON
//! string holding the text exactly as Postgres printed it.
//!
//! | Postgres type | JSON |
//! |---|---|
//! | `bool` | `true` / `false` |
//! | `int2`, `int4`, `oid` | number |
//! | `int8` | number when \|v\| ≤ 2^53−1 (exact in a JavaScript double), else a string of the decimal digits |
//! | `float4`, `float8` | number; `NaN`, `Infinity`, `-Infinity` → those strings |
//! | `numeric` | string, exactly as printed (including `NaN`, `Infinity`, `-Infinity`) |
//! | `text`, `varchar`, `bpchar` (with its padding), `name`, `char`, `uuid`, enums | string |
//! | `json`, `jsonb` | the embedded JSON value (not a string) |
//! | `date` | `"YYYY-MM-DD"`; `infinity`, `-infinity` and `… BC` dates as printed |
//! | `time`, `timetz` | as printed, e.g. `"13:45:00.5"`, `"13:45:00+05:30"` |
//! | `timestamp` | `"YYYY-MM-DDTHH:MM:SS[.ffffff]"` (no zone) |
//! | `timestamptz` | RFC 3339: `"YYYY-MM-DDTHH:MM:SS[.ffffff]Z"` (an offset other than zero: `+HH:MM`) |
//! | `bytea` | the hex text as printed, e.g. `"\\x0102ff"` |
//! | arrays | JSON arrays (nested for several dimensions), elements converted by their type's rule, `NULL` → `null` |
//! | domains | like their base type |
//! | composites with known fields ([`TypeDesc::fields`]) | object, fields by their types |
//! | `hstore` | object of strings and nulls |
//! | anything else (ranges, `interval` (ISO 8601), `money`, `inet`, geometric, table row types, unknown OIDs…) | string, as printed |
//!
//! Details:
//! - `timestamp` / `timestamptz` values that are `infinity`, `-infinity`, BC, or have an offset
//!   with seconds stay exactly as printed. Years past 9999 keep all their digits.
//! - Array bounds decoration (`[0:2]={…}`) is dropped. A malformed array literal becomes the whole
//!   text as a string. A quoted `"NULL"` element is the string `"NULL"`.
//! - Text that does not fit its type's form (which Postgres does not send) becomes a string.
//! - Large numbers inside `json`/`jsonb` are parsed like any JSON number (integers up to
//!   `u64`/`i64` exactly, others as doubles).
//! - Built-in OIDs always use the built-in rule, even if [`TypeRegistry::insert`] was called
//!   for them.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::Value;

/// What pgds knows about a type OID (built-ins are known; user types come from pg_type).
#[derive(Debug, Clone, PartialEq)]
pub struct TypeDesc {
    pub name: String,
    /// `typtype`: `b` base, `e` enum, `d` domain, `c` composite, `r` range, `m` multirange,
    /// `p` pseudo.
    pub typtype: u8,
    /// `typelem` of an array type, else 0.
    pub elem: u32,
    /// `typbasetype` of a domain, else 0.
    pub base: u32,
    /// `typdelim`, usually `b','` (`box` uses `b';'`).
    pub delim: u8,
    /// The attributes (name, type OID) of a composite type created with `CREATE TYPE … AS`.
    pub fields: Vec<(String, u32)>,
}

/// Type OIDs → conversion rules: the built-ins plus types loaded from the catalog.
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    types: HashMap<u32, TypeDesc>,
}

/// The OIDs [`TypeRegistry::new`] knows without consulting the catalog.
pub const BUILTIN_TYPE_OIDS: &[u32] = &[
    16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 603, 700, 701, 1042, 1043, 1082, 1083, 1114, 1184,
    1266, 1700, 2950, 3802, // scalars
    199, 1000, 1001, 1002, 1003, 1005, 1007, 1009, 1014, 1015, 1016, 1020, 1021, 1022, 1028, 1115,
    1182, 1183, 1185, 1231, 1270, 2951, 3807, // arrays
];

/// Largest integer a JavaScript double holds exactly: 2^53 − 1.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;
/// Domain → base hops followed before giving up (a cycle in the registry).
const MAX_DOMAIN_HOPS: usize = 16;
/// Arrays whose element type is again an array type (only a malformed registry does that).
const MAX_ARRAY_NESTING: usize = 4;
/// Postgres' MAXDIM: no array literal has more dimensions.
const MAX_DIMENSIONS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Bool,
    Int,
    Int8,
    Float,
    Text,
    Json,
    Timestamp,
    TimestampTz,
    Array {
        elem: u32,
        delim: u8,
    },
    /// A composite type with known fields: a JSON object.
    Composite(u32),
    /// The `hstore` extension type: a JSON object of strings and nulls.
    Hstore,
}

fn builtin_rule(oid: u32) -> Option<Rule> {
    let array = |elem| Some(Rule::Array { elem, delim: b',' });
    match oid {
        16 => Some(Rule::Bool),
        21 | 23 | 26 => Some(Rule::Int),
        20 => Some(Rule::Int8),
        700 | 701 => Some(Rule::Float),
        114 | 3802 => Some(Rule::Json),
        1114 => Some(Rule::Timestamp),
        1184 => Some(Rule::TimestampTz),
        // bytea, char, name, text, box, bpchar, varchar, date, time, timetz, numeric, uuid.
        17 | 18 | 19 | 25 | 603 | 1042 | 1043 | 1082 | 1083 | 1266 | 1700 | 2950 => {
            Some(Rule::Text)
        }
        1000 => array(16),
        1001 => array(17),
        1002 => array(18),
        1003 => array(19),
        1005 => array(21),
        1007 => array(23),
        1009 => array(25),
        1014 => array(1042),
        1015 => array(1043),
        1016 => array(20),
        1020 => Some(Rule::Array {
            elem: 603,
            delim: b';',
        }),
        1021 => array(700),
        1022 => array(701),
        1028 => array(26),
        1115 => array(1114),
        1182 => array(1082),
        1183 => array(1083),
        1185 => array(1184),
        199 => array(114),
        1231 => array(1700),
        1270 => array(1266),
        2951 => array(2950),
        3807 => array(3802),
        _ => None,
    }
}

impl TypeRegistry {
    /// A registry that knows the built-in types ([`BUILTIN_TYPE_OIDS`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a type loaded from the catalog (user enums, domains, arrays of them…).
    pub fn insert(&mut self, oid: u32, desc: TypeDesc) {
        self.types.insert(oid, desc);
    }

    /// Whether the OID is a built-in or was inserted.
    pub fn contains(&self, oid: u32) -> bool {
        builtin_rule(oid).is_some() || self.types.contains_key(&oid)
    }

    /// Converts one value in the type's text output format. Never fails, never panics.
    pub fn to_json(&self, oid: u32, text: &str) -> Value {
        self.convert(oid, text, 0)
    }

    fn rule(&self, mut oid: u32) -> Rule {
        for _ in 0..MAX_DOMAIN_HOPS {
            if let Some(rule) = builtin_rule(oid) {
                return rule;
            }
            let Some(desc) = self.types.get(&oid) else {
                return Rule::Text;
            };
            if desc.typtype == b'd' {
                if desc.base == 0 {
                    return Rule::Text;
                }
                oid = desc.base;
            } else if desc.elem != 0 {
                // array_out uses the element type's delimiter; an array type's own typdelim is
                // the same in the catalog, so it is the fallback.
                let elem = desc.elem;
                let delim = match builtin_rule(elem) {
                    Some(Rule::Array { .. }) | None => {
                        self.types.get(&elem).map_or(desc.delim, |e| e.delim)
                    }
                    Some(_) if elem == 603 => b';',
                    Some(_) => b',',
                };
                return Rule::Array { elem, delim };
            } else if desc.typtype == b'c' && !desc.fields.is_empty() {
                return Rule::Composite(oid);
            } else if desc.typtype == b'b' && desc.name == "hstore" {
                return Rule::Hstore;
            } else {
                return Rule::Text;
            }
        }
        Rule::Text
    }

    fn convert(&self, oid: u32, text: &str, nesting: usize) -> Value {
        let string = || Value::String(text.to_owned());
        match self.rule(oid) {
            Rule::Bool => match text {
                "t" => Value::Bool(true),
                "f" => Value::Bool(false),
                _ => string(),
            },
            Rule::Int => text.parse::<i64>().map_or_else(|_| string(), Value::from),
            Rule::Int8 => match text.parse::<i64>() {
                Ok(v) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&v) => Value::from(v),
                _ => string(),
            },
            Rule::Float => match text {
                // Rust also parses "inf"/"nan" spellings; Postgres only prints these three.
                "NaN" | "Infinity" | "-Infinity" => string(),
                _ => text
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map_or_else(string, Value::Number),
            },
            Rule::Text => string(),
            Rule::Json => serde_json::from_str(text).unwrap_or_else(|_| string()),
            Rule::Timestamp => timestamp(text).map_or_else(string, Value::String),
            Rule::TimestampTz => timestamptz(text).map_or_else(string, Value::String),
            Rule::Array { elem, delim } => {
                if nesting >= MAX_ARRAY_NESTING {
                    return string();
                }
                ArrayParser::parse(self, elem, delim, text, nesting + 1).unwrap_or_else(string)
            }
            Rule::Composite(oid) => {
                if nesting >= MAX_ARRAY_NESTING {
                    return string();
                }
                self.composite(oid, text, nesting + 1)
                    .unwrap_or_else(string)
            }
            Rule::Hstore => hstore(text).unwrap_or_else(string),
        }
    }

    /// `record_out` text: `(a,"b c",)`; an empty field is NULL, a quoted one has `""` and
    /// backslash escapes. Each field converts by its type.
    fn composite(&self, oid: u32, text: &str, nesting: usize) -> Option<Value> {
        let fields = &self.types.get(&oid)?.fields;
        let inner = text.strip_prefix('(')?.strip_suffix(')')?;
        let mut out = serde_json::Map::with_capacity(fields.len());
        let mut rest = inner;
        for (i, (name, type_oid)) in fields.iter().enumerate() {
            let (raw, quoted, after) = record_field(rest)?;
            let value = if raw.is_empty() && !quoted {
                Value::Null
            } else {
                self.convert(*type_oid, &raw, nesting)
            };
            out.insert(name.clone(), value);
            rest = match after.strip_prefix(',') {
                Some(r) if i + 1 < fields.len() => r,
                None if i + 1 == fields.len() && after.is_empty() => after,
                _ => return None,
            };
        }
        Some(Value::Object(out))
    }
}

/// One field of a record at the start of `text`: (its text, whether it was quoted, the rest
/// starting at the `,` or the end).
fn record_field(text: &str) -> Option<(Cow<'_, str>, bool, &str)> {
    let Some(body) = text.strip_prefix('"') else {
        let end = text.find(',').unwrap_or(text.len());
        return Some((Cow::Borrowed(&text[..end]), false, &text[end..]));
    };
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' if body[i + 1..].starts_with('"') => {
                out.push('"');
                chars.next();
            }
            '"' => return Some((Cow::Owned(out), true, &body[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

/// `hstore_out` text: `"k"=>"v", "k2"=>NULL` → `{"k":"v","k2":null}`.
fn hstore(text: &str) -> Option<Value> {
    fn quoted(text: &str) -> Option<(String, &str)> {
        let body = text.strip_prefix('"')?;
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Some((out, &body[i + 1..])),
                '\\' => out.push(chars.next()?.1),
                c => out.push(c),
            }
        }
        None
    }
    let mut out = serde_json::Map::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (key, after) = quoted(rest)?;
        let after = after.trim_start().strip_prefix("=>")?.trim_start();
        let (value, after) = match after.strip_prefix("NULL") {
            Some(after) => (Value::Null, after),
            None => {
                let (v, after) = quoted(after)?;
                (Value::String(v), after)
            }
        };
        out.insert(key, value);
        rest = after.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
            if rest.is_empty() {
                return None;
            }
        } else if !rest.is_empty() {
            return None;
        }
    }
    Some(Value::Object(out))
}

fn all_digits(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(u8::is_ascii_digit)
}

/// Splits `Y…YYY-MM-DD HH:MM:SS[.f…]<rest>` into date, time and rest.
fn split_timestamp(text: &str) -> Option<(&str, &str, &str)> {
    let b = text.as_bytes();
    let space = b.iter().position(|&c| c == b' ')?;
    let date = &b[..space];
    let n = date.len();
    if n < 10
        || !all_digits(&date[..n - 6])
        || date[n - 6] != b'-'
        || !all_digits(&date[n - 5..n - 3])
        || date[n - 3] != b'-'
        || !all_digits(&date[n - 2..])
    {
        return None;
    }
    let time = &b[space + 1..];
    if time.len() < 8
        || !all_digits(&time[0..2])
        || time[2] != b':'
        || !all_digits(&time[3..5])
        || time[5] != b':'
        || !all_digits(&time[6..8])
    {
        return None;
    }
    let mut end = space + 1 + 8;
    if b.get(end) == Some(&b'.') {
        let digits = b[end + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        end += 1 + digits;
    }
    // All split points are at ASCII bytes, so they are char boundaries.
    Some((&text[..space], &text[space + 1..end], &text[end..]))
}

/// `2026-01-02 03:04:05.678` → `2026-01-02T03:04:05.678`.
fn timestamp(text: &str) -> Option<String> {
    let (date, time, rest) = split_timestamp(text)?;
    if !rest.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(date);
    out.push('T');
    out.push_str(time);
    Some(out)
}

/// `2026-01-02 03:04:05.678+00` → `2026-01-02T03:04:05.678Z`; `+05:30` and `+05` → `+05:30`
/// and `+05:00`.
fn timestamptz(text: &str) -> Option<String> {
    let (date, time, offset) = split_timestamp(text)?;
    let o = offset.as_bytes();
    let (sign, hours, minutes) = match o {
        [s @ (b'+' | b'-'), h1, h2] => (*s, [*h1, *h2], *b"00"),
        [s @ (b'+' | b'-'), h1, h2, b':', m1, m2] => (*s, [*h1, *h2], [*m1, *m2]),
        _ => return None,
    };
    if !all_digits(&hours) || !all_digits(&minutes) {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 4);
    out.push_str(date);
    out.push('T');
    out.push_str(time);
    if sign == b'+' && hours == *b"00" && minutes == *b"00" {
        out.push('Z');
    } else {
        out.push(char::from(sign));
        out.push(char::from(hours[0]));
        out.push(char::from(hours[1]));
        out.push(':');
        out.push(char::from(minutes[0]));
        out.push(char::from(minutes[1]));
    }
    Some(out)
}

/// Whitespace as Postgres' array parser sees it.
fn is_array_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Parses an array literal (`{1,NULL,"a \"b\"",{…}}`), converting elements as it goes.
/// `None` means malformed.
struct ArrayParser<'a> {
    registry: &'a TypeRegistry,
    elem: u32,
    delim: u8,
    text: &'a str,
    pos: usize,
    nesting: usize,
}

impl<'a> ArrayParser<'a> {
    fn parse(
        registry: &'a TypeRegistry,
        elem: u32,
        delim: u8,
        text: &'a str,
        nesting: usize,
    ) -> Option<Value> {
        if !delim.is_ascii_graphic() || matches!(delim, b'{' | b'}' | b'"' | b'\\') {
            return None;
        }
        let mut parser = ArrayParser {
            registry,
            elem,
            delim,
            text,
            pos: 0,
            nesting,
        };
        parser.skip_space();
        if parser.peek() == Some(b'[') {
            parser.skip_dimensions()?;
        }
        if parser.peek() != Some(b'{') {
            return None;
        }
        let value = parser.list(1)?;
        parser.skip_space();
        (parser.pos == text.len()).then_some(value)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_array_space) {
            self.pos += 1;
        }
    }

    /// Skips `[lo:hi]…=`.
    fn skip_dimensions(&mut self) -> Option<()> {
        let rest = &self.text.as_bytes()[self.pos..];
        let eq = rest.iter().position(|&b| b == b'=')?;
        let decoration = &rest[..eq];
        if !decoration.iter().all(|&b| {
            matches!(b, b'[' | b']' | b':' | b'-' | b'+' | b'0'..=b'9') || is_array_space(b)
        }) {
            return None;
        }
        self.pos += eq + 1;
        self.skip_space();
        Some(())
    }

    /// `{…}` starting at the `{`.
    fn list(&mut self, dimension: usize) -> Option<Value> {
        if dimension > MAX_DIMENSIONS {
            return None;
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Some(Value::Array(items));
        }
        loop {
            self.skip_space();
            let item = match self.peek()? {
                b'{' => self.list(dimension + 1)?,
                b'"' => {
                    let text = self.quoted()?;
                    self.registry.convert(self.elem, &text, self.nesting)
                }
                _ => match self.unquoted()? {
                    None => Value::Null,
                    Some(text) => self.registry.convert(self.elem, &text, self.nesting),
                },
            };
            items.push(item);
            self.skip_space();
            match self.peek()? {
                b'}' => {
                    self.pos += 1;
                    return Some(Value::Array(items));
                }
                b if b == self.delim => self.pos += 1,
                _ => return None,
            }
        }
    }

    /// Appends the character escaped by the backslash at `self.pos`.
    fn escaped(&mut self, out: &mut String) -> Option<()> {
        self.pos += 1;
        let c = self.text[self.pos..].chars().next()?;
        out.push(c);
        self.pos += c.len_utf8();
        Some(())
    }

    /// `"…"` starting at the opening quote, with backslash escapes.
    fn quoted(&mut self) -> Option<Cow<'a, str>> {
        self.pos += 1;
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut segment = start;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    let out = owned.get_or_insert_with(String::new);
                    out.push_str(&self.text[segment..self.pos]);
                    self.escaped(out)?;
                    segment = self.pos;
                }
                _ => self.pos += 1,
            }
        }
        let end = self.pos;
        self.pos += 1;
        Some(match owned {
            None => Cow::Borrowed(&self.text[start..end]),
            Some(mut out) => {
                out.push_str(&self.text[segment..end]);
                Cow::Owned(out)
            }
        })
    }

    /// An unquoted element up to the delimiter or `}`, trimmed of surrounding whitespace.
    /// `Some(None)` is an SQL NULL.
    fn unquoted(&mut self) -> Option<Option<Cow<'a, str>>> {
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut segment = start;
        // End of the text to keep (after the last non-space byte), in `text` or in `owned`.
        let mut keep = start;
        loop {
            match self.peek()? {
                b'{' | b'"' => return None,
                b'}' => break,
                b if b == self.delim => break,
                b'\\' => {
                    let out = owned.get_or_insert_with(String::new);
                    out.push_str(&self.text[segment..self.pos]);
                    self.escaped(out)?;
                    segment = self.pos;
                    keep = out.len();
                }
                b => {
                    self.pos += 1;
                    if !is_array_space(b) {
                        keep = match &owned {
                            None => self.pos,
                            Some(out) => out.len() + (self.pos - segment),
                        };
                    }
                }
            }
        }
        match owned {
            None => {
                let text = &self.text[start..keep];
                if text.is_empty() {
                    None
                } else if text.eq_ignore_ascii_case("NULL") {
                    Some(None)
                } else {
                    Some(Some(Cow::Borrowed(text)))
                }
            }
            Some(mut out) => {
                out.push_str(&self.text[segment..self.pos]);
                out.truncate(keep);
                Some(Some(Cow::Owned(out)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ENUM: u32 = 16400;
    const ENUM_ARRAY: u32 = 16401;
    const DOMAIN: u32 = 16402;
    const DOMAIN_OF_DOMAIN: u32 = 16403;
    const DOMAIN_ARRAY: u32 = 16404;
    const CYCLE_A: u32 = 16405;
    const CYCLE_B: u32 = 16406;
    const DOMAIN_OVER_ARRAY: u32 = 16407;
    const COMPOSITE: u32 = 16408;
    const SEMI_ARRAY: u32 = 16409;
    const SELF_ARRAY: u32 = 16410;
    const POINT3: u32 = 16411;
    const LABELLED: u32 = 16412;
    const LABELLED_ARRAY: u32 = 16413;
    const HSTORE: u32 = 16414;

    fn desc(name: &str, typtype: u8, elem: u32, base: u32, delim: u8) -> TypeDesc {
        TypeDesc {
            name: name.into(),
            typtype,
            elem,
            base,
            delim,
            fields: Vec::new(),
        }
    }

    fn registry() -> TypeRegistry {
        let mut r = TypeRegistry::new();
        r.insert(ENUM, desc("mood", b'e', 0, 0, b','));
        r.insert(ENUM_ARRAY, desc("_mood", b'b', ENUM, 0, b','));
        r.insert(DOMAIN, desc("posint", b'd', 0, 23, b','));
        r.insert(DOMAIN_OF_DOMAIN, desc("small", b'd', 0, DOMAIN, b','));
        r.insert(DOMAIN_ARRAY, desc("_posint", b'b', DOMAIN, 0, b','));
        r.insert(CYCLE_A, desc("a", b'd', 0, CYCLE_B, b','));
        r.insert(CYCLE_B, desc("b", b'd', 0, CYCLE_A, b','));
        r.insert(DOMAIN_OVER_ARRAY, desc("ints", b'd', 0, 1007, b','));
        r.insert(COMPOSITE, desc("pair", b'c', 0, 0, b','));
        // An array of an unregistered element type: its own delimiter is used.
        r.insert(SEMI_ARRAY, desc("_thing", b'b', 99_999, 0, b';'));
        r.insert(SELF_ARRAY, desc("_loop", b'b', SELF_ARRAY, 0, b','));
        let mut point3 = desc("point3", b'c', 0, 0, b',');
        point3.fields = vec![("x".into(), 23), ("y".into(), 701), ("z".into(), 1700)];
        r.insert(POINT3, point3);
        let mut labelled = desc("labelled", b'c', 0, 0, b',');
        labelled.fields = vec![
            ("label".into(), 25),
            ("at".into(), POINT3),
            ("tags".into(), 1009),
            ("mood".into(), ENUM),
        ];
        r.insert(LABELLED, labelled);
        r.insert(LABELLED_ARRAY, desc("_labelled", b'b', LABELLED, 0, b','));
        r.insert(HSTORE, desc("hstore", b'b', 0, 0, b','));
        // Built-in rules win over catalog rows for built-in OIDs.
        r.insert(23, desc("int4", b'b', 0, 0, b','));
        r
    }

    fn check(cases: &[(u32, &str, Value)]) {
        let r = registry();
        for (oid, text, expected) in cases {
            assert_eq!(&r.to_json(*oid, text), expected, "oid {oid}, text {text:?}");
        }
    }

    #[test]
    fn scalars() {
        check(&[
            (16, "t", json!(true)),
            (16, "f", json!(false)),
            (16, "maybe", json!("maybe")),
            (21, "-32768", json!(-32768)),
            (23, "2147483647", json!(2147483647)),
            (23, "-2147483648", json!(-2147483648)),
            (23, "12x", json!("12x")),
            (26, "4294967295", json!(4294967295u32)),
            (20, "0", json!(0)),
            (20, "9007199254740991", json!(9007199254740991i64)),
            (20, "-9007199254740991", json!(-9007199254740991i64)),
            (20, "9007199254740992", json!("9007199254740992")),
            (20, "-9007199254740992", json!("-9007199254740992")),
            (20, "9223372036854775807", json!("9223372036854775807")),
            (20, "-9223372036854775808", json!("-9223372036854775808")),
            (701, "1e+308", json!(1e308)),
            (
                701,
                "-1.7976931348623157e+308",
                json!(-1.7976931348623157e308),
            ),
            (701, "5e-324", json!(5e-324)),
            (701, "0.30000000000000004", json!(0.30000000000000004)),
            (701, "-0", json!(-0.0)),
            (701, "NaN", json!("NaN")),
            (701, "Infinity", json!("Infinity")),
            (701, "-Infinity", json!("-Infinity")),
            (701, "inf", json!("inf")),
            (700, "1.1", json!(1.1)),
            (700, "3.4028235e+38", json!(3.4028235e38)),
            (700, "NaN", json!("NaN")),
            (1700, "123.4500", json!("123.4500")),
            (
                1700,
                "-98765432109876543210.0123456789",
                json!("-98765432109876543210.0123456789"),
            ),
            (1700, "NaN", json!("NaN")),
            (1700, "Infinity", json!("Infinity")),
            (1700, "-Infinity", json!("-Infinity")),
            (25, "", json!("")),
            (
                25,
                "héllo 𝄞 😀 \"q\" \\ \n",
                json!("héllo 𝄞 😀 \"q\" \\ \n"),
            ),
            (1043, "varchar", json!("varchar")),
            (1042, "ab   ", json!("ab   ")),
            (19, "pg_class", json!("pg_class")),
            (18, "r", json!("r")),
            (
                2950,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            ),
            (ENUM, "happy", json!("happy")),
            (17, "\\x0102ff", json!("\\x0102ff")),
            (17, "\\x", json!("\\x")),
        ]);
    }

    #[test]
    fn json_values() {
        check(&[
            (
                114,
                r#"{"a": [1, 2.5, null, "x"]}"#,
                json!({"a": [1, 2.5, null, "x"]}),
            ),
            (3802, r#"{"a": {"b": true}}"#, json!({"a": {"b": true}})),
            (3802, r#""just a string""#, json!("just a string")),
            (3802, "18446744073709551615", json!(18446744073709551615u64)),
            (3802, "null", Value::Null),
            (114, "{not json", json!("{not json")),
        ]);
    }

    #[test]
    fn dates_and_times() {
        check(&[
            (1082, "2026-01-02", json!("2026-01-02")),
            (1082, "infinity", json!("infinity")),
            (1082, "-infinity", json!("-infinity")),
            (1082, "0044-03-15 BC", json!("0044-03-15 BC")),
            (1083, "13:45:00", json!("13:45:00")),
            (1083, "13:45:00.123456", json!("13:45:00.123456")),
            (1266, "13:45:00+05:30", json!("13:45:00+05:30")),
            (
                1114,
                "2026-01-02 03:04:05.678",
                json!("2026-01-02T03:04:05.678"),
            ),
            (1114, "2026-01-02 03:04:05", json!("2026-01-02T03:04:05")),
            (1114, "10000-01-01 00:00:00", json!("10000-01-01T00:00:00")),
            (1114, "infinity", json!("infinity")),
            (1114, "-infinity", json!("-infinity")),
            (
                1114,
                "0044-03-15 12:00:00 BC",
                json!("0044-03-15 12:00:00 BC"),
            ),
            (1114, "2026-01-02 03:04:05.", json!("2026-01-02 03:04:05.")),
            (1114, "2026-01-02T03:04:05", json!("2026-01-02T03:04:05")),
            (
                1184,
                "2026-01-02 03:04:05.678+00",
                json!("2026-01-02T03:04:05.678Z"),
            ),
            (
                1184,
                "2026-01-02 03:04:05+00",
                json!("2026-01-02T03:04:05Z"),
            ),
            (
                1184,
                "2026-01-02 03:04:05+00:00",
                json!("2026-01-02T03:04:05Z"),
            ),
            (
                1184,
                "2026-01-02 03:04:05.5+05:30",
                json!("2026-01-02T03:04:05.5+05:30"),
            ),
            (
                1184,
                "2026-01-02 03:04:05+05",
                json!("2026-01-02T03:04:05+05:00"),
            ),
            (
                1184,
                "2026-01-02 03:04:05-08",
                json!("2026-01-02T03:04:05-08:00"),
            ),
            (
                1184,
                "1895-01-01 00:00:00+00:19:32",
                json!("1895-01-01 00:00:00+00:19:32"),
            ),
            (
                1184,
                "0044-03-15 12:00:00+00 BC",
                json!("0044-03-15 12:00:00+00 BC"),
            ),
            (1184, "infinity", json!("infinity")),
            (1184, "-infinity", json!("-infinity")),
            (1184, "2026-01-02 03:04:05", json!("2026-01-02 03:04:05")),
            (
                1184,
                "2026-01-02 03:04:05+0x",
                json!("2026-01-02 03:04:05+0x"),
            ),
        ]);
    }

    #[test]
    fn arrays() {
        check(&[
            (1007, "{}", json!([])),
            (1007, "{1,2,NULL,3}", json!([1, 2, null, 3])),
            (1007, "{{1,2},{3,4}}", json!([[1, 2], [3, 4]])),
            (
                1007,
                "{{{1},{2}},{{3},{4}}}",
                json!([[[1], [2]], [[3], [4]]]),
            ),
            (1007, "[0:1]={5,6}", json!([5, 6])),
            (1007, "[1:2][-1:0]={{1,2},{3,4}}", json!([[1, 2], [3, 4]])),
            (1007, " { 1 , 2 } ", json!([1, 2])),
            (1000, "{t,f,NULL}", json!([true, false, null])),
            (1005, "{-1}", json!([-1])),
            (1028, "{26}", json!([26])),
            (1016, "{1,9007199254740992}", json!([1, "9007199254740992"])),
            (
                1022,
                "{NaN,1.5,-Infinity,-0}",
                json!(["NaN", 1.5, "-Infinity", -0.0]),
            ),
            (1021, "{1.1}", json!([1.1])),
            (1231, "{1.50,NaN}", json!(["1.50", "NaN"])),
            (
                1009,
                r#"{a,"b c","a \"b\"","NULL",NULL,null,"back\\slash","","{}"}"#,
                json!([
                    "a",
                    "b c",
                    "a \"b\"",
                    "NULL",
                    null,
                    null,
                    "back\\slash",
                    "",
                    "{}"
                ]),
            ),
            (1009, r#"{"😀 x",é,𝄞}"#, json!(["😀 x", "é", "𝄞"])),
            (
                1009,
                r#"{a\,b,\N\ULL, x\ \ }"#,
                json!(["a,b", "NULL", "x  "]),
            ),
            (1015, "{x}", json!(["x"])),
            (1014, r#"{"a  "}"#, json!(["a  "])),
            (1003, "{pg_class}", json!(["pg_class"])),
            (1002, "{a}", json!(["a"])),
            (
                2951,
                "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
                json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
            ),
            (
                199,
                r#"{"{\"a\":1}","[1,2]",NULL}"#,
                json!([{"a": 1}, [1, 2], null]),
            ),
            (
                3807,
                r#"{"{\"a\": \"q\\\"\"}",3}"#,
                json!([{"a": "q\""}, 3]),
            ),
            (
                1182,
                "{2026-01-02,infinity}",
                json!(["2026-01-02", "infinity"]),
            ),
            (1183, "{13:45:00}", json!(["13:45:00"])),
            (1270, "{13:45:00+00}", json!(["13:45:00+00"])),
            (
                1115,
                r#"{"2026-01-02 03:04:05"}"#,
                json!(["2026-01-02T03:04:05"]),
            ),
            (
                1185,
                r#"{"2026-01-02 03:04:05.1+00",infinity,NULL}"#,
                json!(["2026-01-02T03:04:05.1Z", "infinity", null]),
            ),
            (1001, r#"{"\\x01ff"}"#, json!(["\\x01ff"])),
            (
                1020,
                "{(1,1),(0,0);(2,2),(1,1)}",
                json!(["(1,1),(0,0)", "(2,2),(1,1)"]),
            ),
            // Malformed literals: the whole text.
            (1007, "{1,2", json!("{1,2")),
            (1007, "{1,,2}", json!("{1,,2}")),
            (1007, "{1,}", json!("{1,}")),
            (1007, "{1}x", json!("{1}x")),
            (1007, "1,2", json!("1,2")),
            (1007, "", json!("")),
            (1009, r#"{"abc}"#, json!(r#"{"abc}"#)),
            (1009, r#"{a"b"}"#, json!(r#"{a"b"}"#)),
            (1009, r#"{"a"b}"#, json!(r#"{"a"b}"#)),
            (1009, "{a\\}", json!("{a\\}")),
            (1007, "[0:1]{1}", json!("[0:1]{1}")),
            (1007, "[a]={1}", json!("[a]={1}")),
            (1007, "{{{{{{{1}}}}}}}", json!("{{{{{{{1}}}}}}}")),
            (1007, "{{{{{{1}}}}}}", json!([[[[[[1]]]]]])),
        ]);
    }

    #[test]
    fn composites_become_objects_by_field_type() {
        check(&[
            (
                POINT3,
                "(1,2.5,3.25)",
                json!({"x": 1, "y": 2.5, "z": "3.25"}),
            ),
            (POINT3, "(,,)", json!({"x": null, "y": null, "z": null})),
            (
                LABELLED,
                r#"("a ""quoted"" \\ label","(1,2,3)","{x,""y z""}",happy)"#,
                json!({"label": "a \"quoted\" \\ label", "at": {"x": 1, "y": 2.0, "z": "3"},
                       "tags": ["x", "y z"], "mood": "happy"}),
            ),
            (
                LABELLED,
                r#"("",,{},)"#,
                json!({"label": "", "at": null, "tags": [], "mood": null}),
            ),
            (
                LABELLED_ARRAY,
                r#"{"(a,\"(1,2,3)\",{},sad)",NULL}"#,
                json!([{"label": "a", "at": {"x": 1, "y": 2.0, "z": "3"}, "tags": [], "mood": "sad"}, null]),
            ),
            // Malformed or of another arity: the text as printed.
            (POINT3, "(1,2)", json!("(1,2)")),
            (POINT3, "(1,2,3,4)", json!("(1,2,3,4)")),
            (POINT3, "1,2,3", json!("1,2,3")),
            (LABELLED, r#"("open,,,)"#, json!(r#"("open,,,)"#)),
        ]);
    }

    #[test]
    fn hstore_becomes_an_object_of_strings() {
        check(&[
            (HSTORE, "", json!({})),
            (
                HSTORE,
                r#""a"=>"1", "b"=>NULL, "q\"k"=>"v\\w""#,
                json!({"a": "1", "b": null, "q\"k": "v\\w"}),
            ),
            (HSTORE, r#""a"=>"1","#, json!(r#""a"=>"1","#)),
            (HSTORE, r#""a"=>1"#, json!(r#""a"=>1"#)),
        ]);
    }

    #[test]
    fn user_types() {
        check(&[
            (
                ENUM_ARRAY,
                "{happy,sad,NULL}",
                json!(["happy", "sad", null]),
            ),
            (DOMAIN, "5", json!(5)),
            (DOMAIN_OF_DOMAIN, "7", json!(7)),
            (DOMAIN_ARRAY, "{1,2}", json!([1, 2])),
            (DOMAIN_OVER_ARRAY, "{1,2}", json!([1, 2])),
            (CYCLE_A, "5", json!("5")),
            (COMPOSITE, "(1,\"a b\")", json!("(1,\"a b\")")),
            (SEMI_ARRAY, "{a,b;c}", json!(["a,b", "c"])),
            // A self-referencing array type terminates: "1" is not an array literal.
            (SELF_ARRAY, r#"{"{\"{1}\"}"}"#, json!([[["1"]]])),
            (23, "5", json!(5)),
            (1186, "P1Y2M3DT4H5M6S", json!("P1Y2M3DT4H5M6S")),
            (790, "$1.00", json!("$1.00")),
            (869, "192.168.0.1/24", json!("192.168.0.1/24")),
            (3904, "[1,5)", json!("[1,5)")),
            (99_999, "{1,2}", json!("{1,2}")),
        ]);
    }

    #[test]
    fn contains_builtins_and_inserted() {
        let mut r = TypeRegistry::new();
        for &oid in BUILTIN_TYPE_OIDS {
            assert!(r.contains(oid), "{oid}");
            assert!(builtin_rule(oid).is_some(), "{oid}");
        }
        assert!(!r.contains(ENUM));
        assert!(!r.contains(1186));
        r.insert(ENUM, desc("mood", b'e', 0, 0, b','));
        assert!(r.contains(ENUM));
    }

    #[test]
    fn pseudo_random_text_never_panics() {
        // xorshift64*: deterministic, no dependency.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        const PIECES: &[&str] = &[
            "{",
            "}",
            "\"",
            "\\",
            ",",
            ";",
            " ",
            "NULL",
            "1",
            "-",
            "+",
            ".",
            ":",
            "e",
            "t",
            "f",
            "[",
            "]",
            "=",
            "0",
            "9",
            "é",
            "😀",
            "T",
            "+00",
            "2026-01-02 03:04:05",
            "\n",
            "null",
        ];
        let r = registry();
        let mut oids: Vec<u32> = BUILTIN_TYPE_OIDS.to_vec();
        oids.extend(ENUM..=SELF_ARRAY);
        oids.push(99_999);
        let mut text = String::new();
        for _ in 0..5000 {
            text.clear();
            for _ in 0..next() % 24 {
                text.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            let oid = oids[(next() % oids.len() as u64) as usize];
            let value = r.to_json(oid, &text);
            // Whatever came out is serialisable JSON.
            assert!(serde_json::to_string(&value).is_ok());
        }
    }
}
