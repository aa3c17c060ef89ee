//! First 4 bytes pick a type OID, the rest is the value text → `to_json` never panics and
//! always yields serialisable JSON.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use pgds::source::value::{BUILTIN_TYPE_OIDS, TypeDesc, TypeRegistry};

/// User types covering enums, domains (including a cycle), arrays of them, and an array with
/// an unusual delimiter.
const USER_TYPES: &[(u32, u8, u32, u32, u8)] = &[
    // (oid, typtype, elem, base, delim)
    (16400, b'e', 0, 0, b','),
    (16401, b'b', 16400, 0, b','),
    (16402, b'd', 0, 23, b','),
    (16403, b'b', 16402, 0, b','),
    (16404, b'd', 0, 16405, b','),
    (16405, b'd', 0, 16404, b','),
    (16406, b'd', 0, 1007, b','),
    (16407, b'b', 16407, 0, b','),
    (16408, b'b', 99_999, 0, b';'),
    (16409, b'c', 0, 0, b','),
];

static REGISTRY: LazyLock<TypeRegistry> = LazyLock::new(|| {
    let mut registry = TypeRegistry::new();
    for &(oid, typtype, elem, base, delim) in USER_TYPES {
        let name = format!("t{oid}");
        registry.insert(
            oid,
            TypeDesc {
                name,
                typtype,
                elem,
                base,
                delim,
                fields: if typtype == b'c' {
                    vec![("a".into(), 23), ("b".into(), 16401), ("c".into(), oid)]
                } else {
                    Vec::new()
                },
            },
        );
    }
    registry
});

static OIDS: LazyLock<Vec<u32>> = LazyLock::new(|| {
    let mut oids = BUILTIN_TYPE_OIDS.to_vec();
    oids.extend(USER_TYPES.iter().map(|t| t.0));
    oids.push(1186); // interval: not special-cased
    oids
});

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let oid = OIDS[u32::from_le_bytes(*head) as usize % OIDS.len()];
    let text = String::from_utf8_lossy(rest);
    let value = REGISTRY.to_json(oid, &text);
    assert!(serde_json::to_string(&value).is_ok());
});
