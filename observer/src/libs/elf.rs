//! Where a function is in a library file: its symbol, from the ELF's dynamic symbol table
//! or, for a library linked in statically (OpenSSL inside an interpreter or an extension
//! module), its static one, as the file offset a uprobe is placed at.

use std::{collections::BTreeMap, fs::File, path::Path};

use object::{Object, ObjectSection, ObjectSymbol, read::ReadCache};

/// Why a file's symbols could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot open: {0}")]
    Open(#[from] std::io::Error),
    #[error("not an ELF object: {0}")]
    Parse(#[from] object::Error),
}

/// The file offsets of those of `wanted` that `path` defines as functions. Reads only the
/// headers and the symbol tables, not the whole file (a Python interpreter or a bundled
/// library can be tens of MB).
pub fn function_offsets(
    path: &Path,
    wanted: &[&'static str],
) -> Result<BTreeMap<&'static str, u64>, ElfError> {
    let cache = ReadCache::new(File::open(path)?);
    let obj = object::File::parse(&cache)?;
    let mut out = BTreeMap::new();
    // The dynamic table first: what the library exports is what its callers reach.
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if !sym.is_definition() || sym.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let Some(&want) = wanted.iter().find(|w| **w == name) else { continue };
        if out.contains_key(want) {
            continue;
        }
        let Some(index) = sym.section_index() else { continue };
        let Ok(section) = obj.section_by_index(index) else { continue };
        let Some((file_off, _)) = section.file_range() else { continue };
        // A uprobe is placed by file offset: the symbol's address within its section,
        // from where that section starts in the file.
        let Some(off) = sym.address().checked_sub(section.address()).and_then(|d| d.checked_add(file_off))
        else {
            continue;
        };
        out.insert(want, off);
        if out.len() == wanted.len() {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A function of this test binary to find by name.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn observer_elf_test_point(x: u64) -> u64 {
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
    }

    #[test]
    fn a_function_offset_points_at_its_code() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let offs = function_offsets(&exe, &["observer_elf_test_point", "no_such_function"]).unwrap();
        assert_eq!(offs.len(), 1, "{offs:?}");
        let off = offs["observer_elf_test_point"];
        // The bytes at that file offset are the function's first instructions in memory.
        let mut file = File::open(&exe).unwrap();
        let mut on_disk = vec![0u8; off as usize + 16];
        file.read_exact(&mut on_disk).unwrap();
        let f = observer_elf_test_point as *const u8;
        // SAFETY: reading 16 bytes of this function's own code.
        let in_memory = unsafe { std::slice::from_raw_parts(f, 16) };
        assert_eq!(&on_disk[off as usize..], in_memory);
        assert_eq!(observer_elf_test_point(1), 0x9e37_79b9_7f4a_7c15u64.rotate_left(17));
    }

    #[test]
    fn an_imported_function_is_not_a_definition() {
        // The test binary calls `write` from libc: an undefined symbol here.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(function_offsets(&exe, &["write"]).unwrap().is_empty());
    }

    #[test]
    fn not_an_elf_file_is_an_error() {
        assert!(matches!(function_offsets(Path::new("/proc/self/status"), &["x"]), Err(ElfError::Parse(_))));
        assert!(matches!(function_offsets(Path::new("/nonexistent/lib.so"), &["x"]), Err(ElfError::Open(_))));
    }
}
