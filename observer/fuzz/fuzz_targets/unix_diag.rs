//! sock_diag netlink replies on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = observer::targets::unix_diag::parse(data);
});
