//! Arbitrary bytes → `decode` returns `Ok` or `Err`, never panics.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgds::source::pgoutput::decode;

fuzz_target!(|data: &[u8]| {
    let _ = decode(&Bytes::copy_from_slice(data));
});
