//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`), just
//! enough to find the byte offset of a struct member.
//!
//! Why our own: Rust eBPF objects carry no CO-RE relocations, so the loader
//! must compute every struct offset the programs use from the *running*
//! kernel and hand it over as a global. Offsets really differ between
//! kernels (`task_struct.exit_code` is at 1164 on 6.18, 2312 on 6.1, 2332 on
//! 6.12), and a compiled-in offset reads garbage.

use std::{collections::HashMap, path::Path};

use anyhow::{bail, ensure, Context, Result};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits from the start of the enclosing struct.
    bit_offset: u32,
    /// Non-zero for a bitfield.
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// size for structs/unions, referenced type id for modifiers/typedefs.
    size_or_type: u32,
    members: Vec<Member>,
}

/// Parsed BTF: types and the string section.
pub struct Btf {
    /// Index 0 is the implicit `void` type.
    types: Vec<Type>,
    strings: Vec<u8>,
    /// Struct name → type id, for structs with members (not forward decls).
    structs: HashMap<String, u32>,
    /// Function name → type id of its FUNC_PROTO (protected files: LSM hook
    /// argument positions).
    funcs: HashMap<String, u32>,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    let s = b.get(off..off + 2).context("BTF truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    let s = b.get(off..off + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| {
            format!(
                "reading kernel BTF from {} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)",
                path.display()
            )
        })?;
        Self::parse(&data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    /// Parses little-endian BTF as the kernel exports it.
    pub fn parse(data: &[u8]) -> Result<Self> {
        ensure!(u16_at(data, 0)? == BTF_MAGIC, "not BTF (bad magic)");
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_sec = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut off = 0usize;
        while off < types_sec.len() {
            let name_off = u32_at(types_sec, off)?;
            let info = u32_at(types_sec, off + 4)?;
            let size_or_type = u32_at(types_sec, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            // Skip (or read) the kind-specific data that follows.
            let extra = match kind {
                1 => 4,  // INT
                3 => 12, // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw = u32_at(types_sec, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (raw & 0x00ff_ffff, raw >> 24)
                        } else {
                            (raw, 0)
                        };
                        members.push(Member {
                            name_off: u32_at(types_sec, m)?,
                            type_id: u32_at(types_sec, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    12 * vlen
                }
                6 => 8 * vlen, // ENUM
                KIND_FUNC_PROTO => {
                    // Parameters: (name_off, type); kept as members with no
                    // offset so `func_params` can name them.
                    for i in 0..vlen {
                        let m = off + i * 8;
                        members.push(Member {
                            name_off: u32_at(types_sec, m)?,
                            type_id: u32_at(types_sec, m + 4)?,
                            bit_offset: 0,
                            bitfield_size: 0,
                        });
                    }
                    8 * vlen
                }
                14 => 4,         // VAR
                15 => 12 * vlen, // DATASEC
                17 => 4,         // DECL_TAG
                19 => 12 * vlen, // ENUM64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                other => bail!("unknown BTF kind {other} at type {}", types.len()),
            };
            off += extra;
            types.push(Type {
                name_off,
                kind,
                size_or_type,
                members,
            });
        }

        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
            funcs: HashMap::new(),
        };
        let mut structs = HashMap::new();
        let mut funcs = HashMap::new();
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 && !t.members.is_empty() {
                let name = btf.name(t.name_off).to_string();
                structs.entry(name).or_insert(id as u32);
            }
            if t.kind == KIND_FUNC && t.name_off != 0 {
                let name = btf.name(t.name_off).to_string();
                funcs.entry(name).or_insert(t.size_or_type);
            }
        }
        btf.structs = structs;
        btf.funcs = funcs;
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of `member` inside `t`, looking through anonymous
    /// struct/union members (e.g. `mm_struct.arg_start` lives in one).
    fn member_bits(&self, t: &Type, member: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name_off != 0 && self.name(m.name_off) == member {
                return Some((m.bit_offset, m.bitfield_size));
            }
        }
        for m in &t.members {
            if m.name_off == 0 {
                if let Some(inner) = self.resolve(m.type_id) {
                    if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                        if let Some((bits, size)) = self.member_bits(inner, member, depth + 1) {
                            // Checked: a hostile BTF file must not wrap
                            // an offset (found by the proc_parsers fuzzer).
                            return m.bit_offset.checked_add(bits).map(|b| (b, size));
                        }
                    }
                }
            }
        }
        None
    }

    /// Byte offset of `strukt.member` in the running kernel.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32> {
        let id = *self
            .structs
            .get(strukt)
            .with_context(|| format!("struct {strukt} not found in kernel BTF"))?;
        let t = &self.types[id as usize];
        let (bits, bitfield) = self
            .member_bits(t, member, 0)
            .with_context(|| format!("struct {strukt} has no member {member} in kernel BTF"))?;
        ensure!(
            bitfield == 0 && bits % 8 == 0,
            "{strukt}.{member} is a bitfield; can't read it as a whole value"
        );
        Ok(bits / 8)
    }

    /// Parameter names of kernel function `func` (e.g. `bpf_lsm_inode_setattr`),
    /// in order; `None` when the kernel has no such function.
    pub fn func_params(&self, func: &str) -> Option<Vec<String>> {
        let proto = self.types.get(*self.funcs.get(func)? as usize)?;
        if proto.kind != KIND_FUNC_PROTO {
            return None;
        }
        Some(
            proto
                .members
                .iter()
                .map(|m| self.name(m.name_off).to_string())
                .collect(),
        )
    }

    /// Size in bytes of struct `name` (protected files: the register window).
    pub fn struct_size(&self, name: &str) -> Option<u32> {
        let id = *self.structs.get(name)?;
        self.types.get(id as usize).map(|t| t.size_or_type)
    }

    /// Whether the kernel BTF has a struct of this name (used by probes).
    pub fn has_struct(&self, name: &str) -> bool {
        self.structs.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel always has these; their offsets must be sane and
    /// distinct. (A fixed expected value would be wrong on other kernels.)
    #[test]
    fn reads_task_struct_offsets_from_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            panic!("this test needs /sys/kernel/btf/vmlinux");
        };
        let exit = btf.member_offset("task_struct", "exit_code").unwrap();
        let start = btf.member_offset("task_struct", "start_time").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        assert!(exit > 0 && start > 0 && tgid > 0);
        assert_ne!(exit, start);
        // arg_start sits in an anonymous struct on recent kernels.
        let a = btf.member_offset("mm_struct", "arg_start").unwrap();
        let b = btf.member_offset("mm_struct", "arg_end").unwrap();
        assert_eq!(b, a + 8);
        assert!(btf.member_offset("task_struct", "no_such_member").is_err());
        assert!(btf.member_offset("no_such_struct", "x").is_err());
    }

    #[test]
    fn rejects_non_btf() {
        assert!(Btf::parse(b"\x7fELF\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0").is_err());
        assert!(Btf::parse(b"").is_err());
    }
}
