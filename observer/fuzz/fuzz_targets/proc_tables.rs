//! /proc/net/{tcp,tcp6,unix} and status parsers on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::targets::procfs;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = procfs::parse_tcp(&text);
    let _ = procfs::parse_unix(&text);
    let _ = procfs::status_ppid(&text);
    let _ = procfs::socket_inode(&text);
});
