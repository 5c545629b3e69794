//! Just enough of the kernel's BTF to find struct member offsets.
//!
//! Rust eBPF has no CO-RE relocations yet, so the loader resolves the few kernel struct
//! offsets the programs need (to read a socket's addresses at connect/accept time) from
//! /sys/kernel/btf/vmlinux and hands them over as a load-time global. A pure parser over
//! bytes: unknown kinds or malformed data give `None`, never a panic.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// The referenced type, for typedef/const/volatile/restrict/type_tag.
    type_id: u32,
    members: Vec<Member>,
}

/// Parsed BTF: types by id (id 0 is void) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Option<Self> {
        Self::parse(&std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if u16_at(b, 0)? != MAGIC {
            return None;
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = hdr_len.checked_add(u32_at(b, 8)? as usize)?;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = hdr_len.checked_add(u32_at(b, 16)? as usize)?;
        let str_len = u32_at(b, 20)? as usize;
        let tsec = b.get(type_off..type_off.checked_add(type_len)?)?;
        let strings = b.get(str_off..str_off.checked_add(str_len)?)?.to_vec();

        let mut types = vec![Type { name_off: 0, kind: 0, type_id: 0, members: Vec::new() }];
        let mut o = 0;
        while o < tsec.len() {
            let name_off = u32_at(tsec, o)?;
            let info = u32_at(tsec, o + 4)?;
            let size_or_type = u32_at(tsec, o + 8)?;
            o += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = o + 12 * i;
                        let raw = u32_at(tsec, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(tsec, m)?,
                            type_id: u32_at(tsec, m + 4)?,
                            bit_offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                _ => return None,
            };
            o += extra;
            types.push(Type { name_off, kind, type_id: size_or_type, members });
        }
        let mut btf = Self { types, strings, structs: HashMap::new() };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.name(t.name_off).to_string();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Some(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.type_id,
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of member `name` in struct/union `t`, looking into anonymous members;
    /// returns the member's type id too.
    fn find_member(&self, t: &Type, name: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name_off != 0 && self.name(m.name_off) == name {
                return Some((m.bit_offset, m.type_id));
            }
        }
        for m in t.members.iter().filter(|m| m.name_off == 0) {
            let inner = self.resolve(m.type_id)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some((off, ty)) = self.find_member(inner, name, depth + 1)
            {
                return Some((m.bit_offset + off, ty));
            }
        }
        None
    }

    /// Byte offset of `path` (members, possibly nested) inside `struct name`.
    pub fn offset(&self, name: &str, path: &[&str]) -> Option<u32> {
        let mut t = self.types.get(*self.structs.get(name)? as usize)?;
        let mut bits = 0;
        for (i, member) in path.iter().enumerate() {
            let (off, ty) = self.find_member(t, member, 0)?;
            bits += off;
            if i + 1 < path.len() {
                t = self.resolve(ty)?;
            }
        }
        (bits % 8 == 0).then_some(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `struct inner { int a; int b; }` and
    /// `struct outer { long x; union { struct inner in; int y; }; }` (anonymous union).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0in\0y\0long\0".to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };
        let mut t = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| t.extend_from_slice(&x.to_le_bytes()));
        // 1: int (4 bytes)
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { int a @0; int b @32 }
        push(&[s("inner"), (KIND_STRUCT << 24) | 2, 8, s("a"), 1, 0, s("b"), 1, 32]);
        // 3: long
        push(&[s("long"), KIND_INT << 24, 8, 64]);
        // 4: anonymous union { struct inner in; int y; }
        push(&[0, (KIND_UNION << 24) | 2, 8, s("in"), 2, 0, s("y"), 1, 0]);
        // 5: struct outer { long x @0; anon union @64 }
        push(&[s("outer"), (KIND_STRUCT << 24) | 2, 16, s("x"), 3, 0, 0, 4, 64]);
        let mut b = Vec::new();
        for v in [u32::from(MAGIC) | (1 << 16), 24, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn offsets_through_anonymous_unions_and_nested_structs() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset("outer", &["x"]), Some(0));
        assert_eq!(btf.offset("outer", &["y"]), Some(8));
        assert_eq!(btf.offset("outer", &["in", "b"]), Some(12));
        assert_eq!(btf.offset("outer", &["nope"]), None);
        assert_eq!(btf.offset("missing", &["x"]), None);
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        assert!(Btf::parse(&[]).is_none());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]).is_none());
        let mut b = blob();
        b.truncate(b.len() - 20);
        assert!(Btf::parse(&b).is_none());
    }

    #[test]
    fn running_kernel_has_the_socket_offsets() {
        // Only where the kernel has BTF (every machine observer supports).
        let Some(btf) = Btf::from_sys_fs() else {
            assert!(std::env::var_os("OBSERVER_REQUIRE_EBPF").is_none(), "no kernel BTF here");
            eprintln!("SKIPPED running_kernel_has_the_socket_offsets: no kernel BTF");
            return;
        };
        assert!(btf.offset("task_struct", &["files"]).is_some());
        assert_eq!(btf.offset("sock", &["__sk_common", "skc_daddr"]), Some(0));
        assert!(btf.offset("sock", &["__sk_common", "skc_num"]).is_some());
        assert!(btf.offset("unix_address", &["name"]).is_some());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if bytes.len() >= 2 {
                bytes[0] = 0x9f;
                bytes[1] = 0xeb;
            }
            let _ = Btf::parse(&bytes);
        }
    }
}
