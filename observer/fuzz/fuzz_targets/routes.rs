//! Routes files and view resolution on arbitrary text and paths.
#![no_main]
use libfuzzer_sys::fuzz_target;
use observer::views::RouteTable;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (file, path) = text.split_once('\n').unwrap_or((&text, "/"));
    if let Ok(t) = RouteTable::from_routes_file(file) {
        let _ = t.resolve(path);
    }
    let _ = observer::views::template_path(path);
});
