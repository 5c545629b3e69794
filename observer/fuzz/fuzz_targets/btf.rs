//! The BTF member-offset parser on arbitrary blobs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::ebpf::btf::Btf;

fuzz_target!(|data: &[u8]| {
    if let Some(btf) = Btf::parse(data) {
        let _ = btf.offset("sock", &["__sk_common", "skc_num"]);
    }
});
