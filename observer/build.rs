//! Builds the kernel programs (observer-ebpf's bin, for bpfel-unknown-none, with the
//! nightly toolchain and bpf-linker) and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.
//!
//! With `AYA_BUILD_SKIP=1` (e.g. for a quick `cargo check` on a machine without
//! bpf-linker) an empty object is written instead; the loader then refuses to start
//! with a clear message.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, Result};
use aya_build::{Package, Toolchain};

fn main() -> Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("observer-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&object, []).context("writing the empty eBPF object")?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../observer-ebpf");
    let root = root.canonicalize().with_context(|| format!("{}", root.display()))?;
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package { name: "observer-ebpf", root_dir: root, ..Default::default() }],
        // The image's nightly (1.97, LLVM 22) matches bpf-linker built against LLVM 22.
        Toolchain::Custom("nightly"),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` (nightly rust-src, bpf-linker)")?;
    Ok(())
}
