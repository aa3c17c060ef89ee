//! pgoutput (protocol version 1) message decoder: bytes in, typed messages out.
//!
//! Pure and panic-free: any malformed input yields a [`DecodeError`]. Unchanged TOAST values
//! stay distinct from NULL, and the kind of old tuple (`K` key only, `O` full row) is kept.
//!
//! Decoding rules:
//! - Every read is bounds-checked; a short message is [`DecodeError::Truncated`].
//! - Negative counts or lengths, a missing NUL terminator, names that are not valid UTF-8,
//!   unknown tuple kind bytes and unexpected sub-message tags are [`DecodeError::Malformed`].
//! - Trailing bytes after a complete message are rejected ([`DecodeError::Malformed`]): every
//!   protocol-1 message is self-delimiting, so extra bytes mean we are not reading what we
//!   think we are reading (e.g. a streaming/protocol-2 message with a leading xid).
//! - Text and binary column values and logical-message contents are zero-copy slices of the
//!   input [`Bytes`]. Vectors are never pre-allocated from an untrusted count beyond what the
//!   remaining input could possibly hold.
//! - The empty namespace that pgoutput sends for `pg_catalog` (Relation and Type messages) is
//!   decoded as `"pg_catalog"`.

use bytes::Bytes;

use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        /// LSN of the commit record: unique per transaction and ordered like commits.
        final_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        /// End of the commit record: what is acknowledged once the transaction is durable.
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    /// `pg_logical_emit_message` content.
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// A table's shape as announced by a Relation message.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// True when the column is part of the replica identity (flag bit 1).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value that the server did not send (`u`).
    UnchangedToast,
    /// Text format (`t`): the type's output function.
    Text(Bytes),
    /// Binary format (`b`): the type's send function.
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tuple(pub Vec<Datum>);

/// The old row sent with an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// `K`: only the replica identity (key) columns are meaningful; others are NULL.
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

/// The bytes are not a well-formed pgoutput message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {0:?}")]
    UnknownTag(char),
    #[error("truncated pgoutput {message} message: needed {needed} more bytes")]
    Truncated {
        message: &'static str,
        needed: usize,
    },
    #[error("malformed pgoutput {message} message: {detail}")]
    Malformed {
        message: &'static str,
        detail: String,
    },
}

/// Decodes one pgoutput protocol-1 message (the payload of an XLogData message).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let (&tag, _) = data.split_first().ok_or(DecodeError::Empty)?;
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        other => return Err(DecodeError::UnknownTag(char::from(other))),
    };
    let mut r = Reader {
        data,
        pos: 1,
        message,
    };
    let decoded = match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64()?),
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: Lsn(r.u64()?),
            end_lsn: Lsn(r.u64()?),
            commit_time: r.i64()?,
        },
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64()?),
            name: r.string()?,
        },
        b'R' => Message::Relation(r.relation()?),
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.namespace()?,
            name: r.string()?,
        },
        b'I' => {
            let relation = r.u32()?;
            r.expect_new_tuple_tag()?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'N' => None,
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                other => {
                    return Err(
                        r.malformed(format!("unexpected tuple tag {:?}", char::from(other)))
                    );
                }
            };
            if old.is_some() {
                r.expect_new_tuple_tag()?;
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => {
                    return Err(r.malformed(format!(
                        "expected old tuple tag 'K' or 'O', got {:?}",
                        char::from(other)
                    )));
                }
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let count = r.count_i32("relation count")?;
            let options = r.u8()?;
            // Check the whole list is present before allocating for it.
            r.need(count.saturating_mul(4))?;
            let mut relations = Vec::with_capacity(count);
            for _ in 0..count {
                relations.push(r.u32()?);
            }
            Message::Truncate { options, relations }
        }
        _ => {
            // b'M', the only tag left.
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.string()?;
            let len = r.count_i32("content length")?;
            Message::LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
    };
    r.finish()?;
    Ok(decoded)
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn malformed(&self, detail: String) -> DecodeError {
        DecodeError::Malformed {
            message: self.message,
            detail,
        }
    }

    /// Fails unless at least `n` more bytes are available.
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        let remaining = self.remaining();
        if n > remaining {
            return Err(DecodeError::Truncated {
                message: self.message,
                needed: n - remaining,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.data[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A non-negative Int32 count or length.
    fn count_i32(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| self.malformed(format!("negative {what} {n}")))
    }

    /// A non-negative Int16 count.
    fn count_i16(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.malformed(format!("negative {what} {n}")))
    }

    /// `len` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        self.need(len)?;
        let out = self.data.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            // A NUL would be needed at the very least.
            return Err(DecodeError::Truncated {
                message: self.message,
                needed: 1,
            });
        };
        let text = std::str::from_utf8(&rest[..len])
            .map_err(|e| self.malformed(format!("name is not valid UTF-8: {e}")))?
            .to_owned();
        self.pos += len + 1;
        Ok(text)
    }

    /// A namespace name: pgoutput sends an empty string for `pg_catalog`.
    fn namespace(&mut self) -> Result<String, DecodeError> {
        let name = self.string()?;
        Ok(if name.is_empty() {
            "pg_catalog".to_owned()
        } else {
            name
        })
    }

    fn expect_new_tuple_tag(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            b'N' => Ok(()),
            other => Err(self.malformed(format!(
                "expected new tuple tag 'N', got {:?}",
                char::from(other)
            ))),
        }
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = self.u32()?;
        let namespace = self.namespace()?;
        let name = self.string()?;
        let replica_identity = self.u8()?;
        let count = self.count_i16("column count")?;
        // Each column takes at least 10 bytes: flags, an empty name's NUL, type OID, typmod.
        let mut columns = Vec::with_capacity(count.min(self.remaining() / 10));
        for _ in 0..count {
            columns.push(Column {
                is_key: self.u8()? & 1 != 0,
                name: self.string()?,
                type_oid: self.u32()?,
                type_modifier: self.i32()?,
            });
        }
        Ok(Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// TupleData: a column count, then one kind byte (and maybe a value) per column.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.count_i16("column count")?;
        // Each column takes at least its kind byte.
        let mut datums = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let datum = match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.count_i32("value length")?;
                    Datum::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.count_i32("value length")?;
                    Datum::Binary(self.bytes(len)?)
                }
                other => {
                    return Err(
                        self.malformed(format!("unknown column kind {:?}", char::from(other)))
                    );
                }
            };
            datums.push(datum);
        }
        Ok(Tuple(datums))
    }

    /// Rejects trailing bytes.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.malformed(format!("{n} trailing bytes"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny pgoutput encoder for building test messages.
    struct Enc(Vec<u8>);

    impl Enc {
        fn tag(tag: u8) -> Self {
            Enc(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn cstr(self, v: &str) -> Self {
            self.raw(v.as_bytes()).u8(0)
        }
        fn tuple(self, datums: &[Datum]) -> Self {
            let mut enc = self.i16(datums.len() as i16);
            for datum in datums {
                enc = match datum {
                    Datum::Null => enc.u8(b'n'),
                    Datum::UnchangedToast => enc.u8(b'u'),
                    Datum::Text(v) => enc.u8(b't').i32(v.len() as i32).raw(v),
                    Datum::Binary(v) => enc.u8(b'b').i32(v.len() as i32).raw(v),
                };
            }
            enc
        }
        fn build(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn text(v: &'static str) -> Datum {
        Datum::Text(Bytes::from_static(v.as_bytes()))
    }

    fn binary(v: &'static [u8]) -> Datum {
        Datum::Binary(Bytes::from_static(v))
    }

    fn all_kinds() -> Vec<Datum> {
        vec![
            Datum::Null,
            Datum::UnchangedToast,
            text("héllo 𝄞"),
            text(""),
            binary(&[0, 1, 0xff]),
            binary(&[]),
        ]
    }

    /// Every message kind, with the bytes PostgreSQL 15 sends for it.
    fn valid_cases() -> Vec<(&'static str, Bytes, Message)> {
        let key = vec![text("42"), Datum::Null];
        vec![
            (
                "begin",
                Enc::tag(b'B')
                    .u64(0x16_B374_D848)
                    .i64(789_000_000)
                    .u32(0xFFFF_FFFE)
                    .build(),
                Message::Begin {
                    final_lsn: Lsn(0x16_B374_D848),
                    commit_time: 789_000_000,
                    xid: 0xFFFF_FFFE,
                },
            ),
            (
                "commit",
                Enc::tag(b'C').u8(0).u64(10).u64(20).i64(-5).build(),
                Message::Commit {
                    flags: 0,
                    commit_lsn: Lsn(10),
                    end_lsn: Lsn(20),
                    commit_time: -5,
                },
            ),
            (
                "origin",
                Enc::tag(b'O').u64(7).cstr("node_a").build(),
                Message::Origin {
                    commit_lsn: Lsn(7),
                    name: "node_a".into(),
                },
            ),
            (
                "relation",
                Enc::tag(b'R')
                    .u32(16384)
                    .cstr("public")
                    .cstr("tëst")
                    .u8(b'd')
                    .i16(2)
                    .u8(1)
                    .cstr("id")
                    .u32(20)
                    .i32(-1)
                    .u8(0)
                    .cstr("name")
                    .u32(1043)
                    .i32(68)
                    .build(),
                Message::Relation(Relation {
                    oid: 16384,
                    namespace: "public".into(),
                    name: "tëst".into(),
                    replica_identity: b'd',
                    columns: vec![
                        Column {
                            is_key: true,
                            name: "id".into(),
                            type_oid: 20,
                            type_modifier: -1,
                        },
                        Column {
                            is_key: false,
                            name: "name".into(),
                            type_oid: 1043,
                            type_modifier: 68,
                        },
                    ],
                }),
            ),
            (
                "relation in pg_catalog without columns",
                Enc::tag(b'R')
                    .u32(1)
                    .cstr("")
                    .cstr("t")
                    .u8(b'n')
                    .i16(0)
                    .build(),
                Message::Relation(Relation {
                    oid: 1,
                    namespace: "pg_catalog".into(),
                    name: "t".into(),
                    replica_identity: b'n',
                    columns: vec![],
                }),
            ),
            (
                "type",
                Enc::tag(b'Y').u32(16400).cstr("app").cstr("mood").build(),
                Message::Type {
                    oid: 16400,
                    namespace: "app".into(),
                    name: "mood".into(),
                },
            ),
            (
                "type in pg_catalog",
                Enc::tag(b'Y').u32(25).cstr("").cstr("text").build(),
                Message::Type {
                    oid: 25,
                    namespace: "pg_catalog".into(),
                    name: "text".into(),
                },
            ),
            (
                "insert with every datum kind",
                Enc::tag(b'I')
                    .u32(16384)
                    .u8(b'N')
                    .tuple(&all_kinds())
                    .build(),
                Message::Insert {
                    relation: 16384,
                    new: Tuple(all_kinds()),
                },
            ),
            (
                "insert with zero columns",
                Enc::tag(b'I').u32(1).u8(b'N').tuple(&[]).build(),
                Message::Insert {
                    relation: 1,
                    new: Tuple(vec![]),
                },
            ),
            (
                "update without old tuple",
                Enc::tag(b'U')
                    .u32(16384)
                    .u8(b'N')
                    .tuple(&all_kinds())
                    .build(),
                Message::Update {
                    relation: 16384,
                    old: None,
                    new: Tuple(all_kinds()),
                },
            ),
            (
                "update with key old tuple",
                Enc::tag(b'U')
                    .u32(16384)
                    .u8(b'K')
                    .tuple(&key)
                    .u8(b'N')
                    .tuple(&all_kinds())
                    .build(),
                Message::Update {
                    relation: 16384,
                    old: Some(OldTuple::Key(Tuple(key.clone()))),
                    new: Tuple(all_kinds()),
                },
            ),
            (
                "update with full old tuple",
                Enc::tag(b'U')
                    .u32(16384)
                    .u8(b'O')
                    .tuple(&all_kinds())
                    .u8(b'N')
                    .tuple(&key)
                    .build(),
                Message::Update {
                    relation: 16384,
                    old: Some(OldTuple::Full(Tuple(all_kinds()))),
                    new: Tuple(key.clone()),
                },
            ),
            (
                "delete with key",
                Enc::tag(b'D').u32(16384).u8(b'K').tuple(&key).build(),
                Message::Delete {
                    relation: 16384,
                    old: OldTuple::Key(Tuple(key.clone())),
                },
            ),
            (
                "delete with full row",
                Enc::tag(b'D')
                    .u32(16384)
                    .u8(b'O')
                    .tuple(&all_kinds())
                    .build(),
                Message::Delete {
                    relation: 16384,
                    old: OldTuple::Full(Tuple(all_kinds())),
                },
            ),
            (
                "truncate",
                Enc::tag(b'T')
                    .i32(3)
                    .u8(3)
                    .u32(1)
                    .u32(2)
                    .u32(u32::MAX)
                    .build(),
                Message::Truncate {
                    options: 3,
                    relations: vec![1, 2, u32::MAX],
                },
            ),
            (
                "truncate nothing",
                Enc::tag(b'T').i32(0).u8(0).build(),
                Message::Truncate {
                    options: 0,
                    relations: vec![],
                },
            ),
            (
                "transactional logical message",
                Enc::tag(b'M')
                    .u8(1)
                    .u64(99)
                    .cstr("pgds")
                    .i32(3)
                    .raw(b"a\0b")
                    .build(),
                Message::LogicalMessage {
                    transactional: true,
                    lsn: Lsn(99),
                    prefix: "pgds".into(),
                    content: Bytes::from_static(b"a\0b"),
                },
            ),
            (
                "non-transactional empty logical message",
                Enc::tag(b'M').u8(0).u64(1).cstr("").i32(0).build(),
                Message::LogicalMessage {
                    transactional: false,
                    lsn: Lsn(1),
                    prefix: String::new(),
                    content: Bytes::new(),
                },
            ),
        ]
    }

    #[test]
    fn decodes_every_message_kind() {
        for (name, bytes, expected) in valid_cases() {
            assert_eq!(decode(&bytes), Ok(expected), "{name}");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (name, bytes, _) in valid_cases() {
            for len in 0..bytes.len() {
                let cut = bytes.slice(..len);
                assert!(
                    decode(&cut).is_err(),
                    "{name} cut at {len}: {:?}",
                    decode(&cut)
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for (name, bytes, _) in valid_cases() {
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert!(
                matches!(
                    decode(&Bytes::from(longer)),
                    Err(DecodeError::Malformed { .. })
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn values_are_zero_copy_slices() {
        let bytes = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[text("abc"), binary(b"xyz")])
            .build();
        let range = bytes.as_ptr_range();
        let Ok(Message::Insert { new, .. }) = decode(&bytes) else {
            panic!("not an insert");
        };
        for datum in new.0 {
            let (Datum::Text(v) | Datum::Binary(v)) = datum else {
                panic!("unexpected {datum:?}");
            };
            assert!(range.contains(&v.as_ptr()), "value was copied");
        }
    }

    #[test]
    fn malformed_messages() {
        type Check = Box<dyn Fn(&DecodeError) -> bool>;
        let malformed = |detail: &str| -> Check {
            let detail = detail.to_owned();
            Box::new(
                move |e| matches!(e, DecodeError::Malformed { detail: d, .. } if d.contains(&detail)),
            )
        };
        let truncated = || -> Check { Box::new(|e| matches!(e, DecodeError::Truncated { .. })) };
        let cases: Vec<(&str, Bytes, Check)> = vec![
            (
                "empty",
                Bytes::new(),
                Box::new(|e| *e == DecodeError::Empty),
            ),
            (
                "unknown tag",
                Enc::tag(b'Z').build(),
                Box::new(|e| *e == DecodeError::UnknownTag('Z')),
            ),
            (
                "stream start is not protocol 1",
                Enc::tag(b'S').u32(1).u8(1).build(),
                Box::new(|e| *e == DecodeError::UnknownTag('S')),
            ),
            (
                "bad datum kind",
                Enc::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x').build(),
                malformed("unknown column kind 'x'"),
            ),
            (
                "negative text length",
                Enc::tag(b'I')
                    .u32(1)
                    .u8(b'N')
                    .i16(1)
                    .u8(b't')
                    .i32(-1)
                    .build(),
                malformed("negative value length"),
            ),
            (
                "huge text length",
                Enc::tag(b'I')
                    .u32(1)
                    .u8(b'N')
                    .i16(1)
                    .u8(b'b')
                    .i32(i32::MAX)
                    .raw(b"ab")
                    .build(),
                truncated(),
            ),
            (
                "negative column count",
                Enc::tag(b'I').u32(1).u8(b'N').i16(-1).build(),
                malformed("negative column count"),
            ),
            (
                "huge column count, little input",
                Enc::tag(b'I')
                    .u32(1)
                    .u8(b'N')
                    .i16(i16::MAX)
                    .u8(b'n')
                    .build(),
                truncated(),
            ),
            (
                "insert without N",
                Enc::tag(b'I').u32(1).u8(b'K').tuple(&[]).build(),
                malformed("expected new tuple tag"),
            ),
            (
                "update with bad old tag",
                Enc::tag(b'U').u32(1).u8(b'X').tuple(&[]).build(),
                malformed("unexpected tuple tag"),
            ),
            (
                "update old tuple without N",
                Enc::tag(b'U')
                    .u32(1)
                    .u8(b'K')
                    .tuple(&[])
                    .u8(b'K')
                    .tuple(&[])
                    .build(),
                malformed("expected new tuple tag"),
            ),
            (
                "delete with N",
                Enc::tag(b'D').u32(1).u8(b'N').tuple(&[]).build(),
                malformed("expected old tuple tag"),
            ),
            (
                "negative truncate count",
                Enc::tag(b'T').i32(-1).u8(0).build(),
                malformed("negative relation count"),
            ),
            (
                "huge truncate count",
                Enc::tag(b'T').i32(i32::MAX).u8(0).u32(1).build(),
                truncated(),
            ),
            (
                "negative relation column count",
                Enc::tag(b'R')
                    .u32(1)
                    .cstr("a")
                    .cstr("b")
                    .u8(b'd')
                    .i16(-3)
                    .build(),
                malformed("negative column count"),
            ),
            (
                "huge relation column count",
                Enc::tag(b'R')
                    .u32(1)
                    .cstr("a")
                    .cstr("b")
                    .u8(b'd')
                    .i16(i16::MAX)
                    .build(),
                truncated(),
            ),
            (
                "missing NUL",
                Enc::tag(b'O').u64(1).raw(b"abc").build(),
                truncated(),
            ),
            (
                "invalid UTF-8 name",
                Enc::tag(b'O').u64(1).raw(b"a\xffb\0").build(),
                malformed("UTF-8"),
            ),
            (
                "negative message length",
                Enc::tag(b'M').u8(1).u64(1).cstr("p").i32(-2).build(),
                malformed("negative content length"),
            ),
            (
                "trailing garbage",
                Enc::tag(b'B').u64(1).i64(2).u32(3).u8(0).build(),
                malformed("1 trailing bytes"),
            ),
        ];
        for (name, bytes, check) in cases {
            match decode(&bytes) {
                Err(e) => assert!(check(&e), "{name}: unexpected error {e:?}"),
                Ok(m) => panic!("{name}: decoded {m:?}"),
            }
        }
    }

    #[test]
    fn truncated_reports_missing_bytes() {
        let bytes = Enc::tag(b'B').u64(1).build();
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Truncated {
                message: "Begin",
                needed: 8
            })
        );
    }

    /// xorshift64*: a tiny deterministic generator for the no-panic test.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn pseudo_random_input_never_panics() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let valid: Vec<Vec<u8>> = valid_cases()
            .into_iter()
            .map(|(_, b, _)| b.to_vec())
            .collect();
        const TAGS: &[u8] = b"BCORYIUDTMnutbNKOxZ";
        let mut decoded = 0;
        for i in 0..5000 {
            let input = if i % 2 == 0 {
                // Mutate a valid message: flip, overwrite, insert or drop a few bytes.
                let mut bytes = valid[rng.below(valid.len())].clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(bytes.len() + 1);
                    match rng.below(4) {
                        0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
                        1 if at < bytes.len() => bytes[at] = TAGS[rng.below(TAGS.len())],
                        2 => bytes.insert(at, rng.next() as u8),
                        _ if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        _ => {}
                    }
                }
                bytes
            } else {
                // Random bytes behind a plausible tag, biased towards small values and tag bytes.
                let len = rng.below(64);
                let mut bytes = vec![TAGS[rng.below(10)]];
                for _ in 0..len {
                    let b = match rng.below(3) {
                        0 => 0,
                        1 => TAGS[rng.below(TAGS.len())],
                        _ => rng.next() as u8,
                    };
                    bytes.push(b);
                }
                bytes
            };
            if decode(&Bytes::from(input)).is_ok() {
                decoded += 1;
            }
        }
        // Sanity check that the mutations do not all fail at the first byte.
        assert!(decoded > 0);
    }
}
