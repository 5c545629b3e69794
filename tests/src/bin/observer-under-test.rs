//! The observer, built inside this test package so that `CARGO_BIN_EXE_observer-under-test`
//! always names a binary fresh from the current sources. It is the same entry point as
//! `observer/src/main.rs` (a second binary named `observer` would collide in target/).
fn main() -> std::process::ExitCode {
    observer::cli::main()
}
