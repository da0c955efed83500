//! The kernel's own type information (/sys/kernel/btf/vmlinux), read far enough to
//! find a struct member's offset and a function's type id.
//!
//! A BPF program that reads kernel structures must use this kernel's offsets (they move
//! with the configuration and the version), and an iterator program is attached by the
//! BTF id of its target function. The format is the kernel's `Documentation/bpf/btf.rst`:
//! a header, then the types (ids from 1, in order), then the strings.

use crate::{Error, Result};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

/// The kinds this reader looks into; every other kind is only stepped over.
mod kind {
    pub const INT: u32 = 1;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const TYPE_TAG: u32 = 18;
}

/// One type's fixed part, and where its kind-specific tail starts.
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` for ints, structs and unions; the referred type for the others.
    size_or_type: u32,
    tail: usize,
}

/// A parsed BTF blob.
pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// `types[id - 1]`.
    types: Vec<Type>,
}

fn u16_at(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

/// Bytes that follow the fixed part of a type of `kind` with `vlen` entries, or None for
/// a kind this reader does not know (a newer kernel's): the blob cannot be walked then.
fn tail_len(kind: u32, vlen: u32) -> Option<usize> {
    let vlen = vlen as usize;
    Some(match kind {
        1 => 4,             // INT
        2 => 0,             // PTR
        3 => 12,            // ARRAY
        4 | 5 => 12 * vlen, // STRUCT, UNION
        6 => 8 * vlen,      // ENUM
        7..=11 => 0,        // FWD, TYPEDEF, VOLATILE, CONST, RESTRICT
        12 => 0,            // FUNC
        13 => 8 * vlen,     // FUNC_PROTO
        14 => 4,            // VAR
        15 => 12 * vlen,    // DATASEC
        16 => 0,            // FLOAT
        17 => 4,            // DECL_TAG
        18 => 0,            // TYPE_TAG
        19 => 12 * vlen,    // ENUM64
        _ => return None,
    })
}

impl Btf {
    /// The running kernel's types.
    pub fn vmlinux() -> Result<Self> {
        let data = std::fs::read(VMLINUX).map_err(|e| Error::io(VMLINUX, e))?;
        Self::parse(data).map_err(|what| Error::Parse {
            path: VMLINUX.into(),
            what: "BTF",
            line: what.into(),
        })
    }

    pub fn parse(data: Vec<u8>) -> std::result::Result<Self, &'static str> {
        if u16_at(&data, 0) != Some(MAGIC) {
            return Err("not BTF, or not little-endian (bad magic)");
        }
        let field = |i: usize| u32_at(&data, 4 + 4 * i).ok_or("header cut short");
        let hdr_len = field(0)? as usize;
        let (type_off, type_len) = (field(1)? as usize, field(2)? as usize);
        let (str_off, str_len) = (field(3)? as usize, field(4)? as usize);
        let types_at = hdr_len + type_off;
        let strings = hdr_len + str_off;
        if types_at + type_len > data.len() || strings + str_len > data.len() {
            return Err("sections run past the end");
        }
        let mut types = Vec::new();
        let mut at = types_at;
        while at < types_at + type_len {
            let name_off = u32_at(&data, at).ok_or("type cut short")?;
            let info = u32_at(&data, at + 4).ok_or("type cut short")?;
            let size_or_type = u32_at(&data, at + 8).ok_or("type cut short")?;
            let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
            let tail = at + 12;
            at = tail + tail_len(kind, vlen).ok_or("a type of a kind this reader does not know")?;
            types.push(Type {
                name_off,
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                size_or_type,
                tail,
            });
        }
        Ok(Self {
            data,
            strings,
            strings_len: str_len,
            types,
        })
    }

    fn name(&self, t: &Type) -> &[u8] {
        self.str_at(t.name_off)
    }

    fn str_at(&self, off: u32) -> &[u8] {
        let start = self.strings + off as usize;
        let end = self.strings + self.strings_len;
        let s = self.data.get(start..end).unwrap_or(&[]);
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    fn find(&self, kind: u32, name: &str) -> Option<(u32, &Type)> {
        self.types
            .iter()
            .enumerate()
            .find(|(_, t)| t.kind == kind && self.name(t) == name.as_bytes())
            .map(|(i, t)| (i as u32 + 1, t))
    }

    /// The id of function `name`.
    pub fn func(&self, name: &str) -> Option<u32> {
        self.find(kind::FUNC, name).map(|(id, _)| id)
    }

    /// `id` without its typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The byte offset and size of integer member `member` of `struct name`, looking
    /// through anonymous structs and unions as C does.
    pub fn int_member(&self, name: &str, member: &str) -> Option<(u32, u32)> {
        let (_, t) = self.find(kind::STRUCT, name)?;
        self.member_in(t, member, 0, 0)
    }

    fn member_in(&self, t: &Type, member: &str, base_bits: u32, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 || !matches!(t.kind, kind::STRUCT | kind::UNION) {
            return None;
        }
        for i in 0..t.vlen as usize {
            let at = t.tail + 12 * i;
            let m_name = u32_at(&self.data, at)?;
            let m_type = u32_at(&self.data, at + 4)?;
            let raw = u32_at(&self.data, at + 8)?;
            // With kind_flag, the high byte is a bitfield's size; bitfields are not ours.
            let (bits, bitfield) = if t.kind_flag {
                (raw & 0x00ff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            let bits = base_bits + bits;
            let inner = self.resolve(m_type)?;
            if self.str_at(m_name) == member.as_bytes() {
                if bitfield != 0 || !bits.is_multiple_of(8) || inner.kind != kind::INT {
                    return None;
                }
                return Some((bits / 8, inner.size_or_type));
            }
            if m_name == 0 {
                if let Some(found) = self.member_in(inner, member, bits, depth + 1) {
                    return Some(found);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vma_fields_and_iterator_target_in_this_kernel() {
        let btf = Btf::vmlinux().unwrap();
        // On this kernel vm_start and vm_flags sit inside anonymous unions.
        let (start, size) = btf.int_member("vm_area_struct", "vm_start").unwrap();
        assert_eq!((start, size), (0, 8));
        let (end, _) = btf.int_member("vm_area_struct", "vm_end").unwrap();
        assert_eq!(end, 8);
        let (flags, size) = btf.int_member("vm_area_struct", "vm_flags").unwrap();
        assert!(
            flags > end && size == 8,
            "vm_flags at {flags}, {size} bytes"
        );
        assert!(btf.func("bpf_iter_task_vma").is_some());
        assert!(btf.int_member("vm_area_struct", "no_such_member").is_none());
        assert!(btf.func("no_such_function_here").is_none());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(Btf::parse(vec![0; 64]).is_err());
        // The right magic, then sections that claim more than there is.
        let mut d = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        d.extend([0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(Btf::parse(d).is_err());
    }
}
