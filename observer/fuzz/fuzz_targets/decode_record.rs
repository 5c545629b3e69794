//! Ring-buffer items: any bytes decode to a record or an error, never a panic, and a
//! decoded data record never claims more captured bytes than it moved.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::events::{Record, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(Record::Data(d)) = decode(data) {
        assert!(d.no_capture || d.bytes.len() as u64 <= d.total_len);
    }
});
