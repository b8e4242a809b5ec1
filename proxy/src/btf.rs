//! Where the kernel keeps a socket's transparent flag, read from `/sys/kernel/btf/vmlinux`.
//!
//! The classifier must refuse a socket that is not transparent (T5), as
//! `nf_tproxy_sk_is_transparent` does, but `bpf_sk_assign` does not check it and
//! `struct bpf_sock` does not expose it. `inet_sk_transparent()` reads one of three places
//! depending on the socket's state; this module finds them in the running kernel's BTF
//! (aya has no CO-RE field relocations for Rust programs) and hands the classifier byte
//! offsets and bits:
//!
//! * full sockets: bit `INET_FLAGS_TRANSPARENT` of `inet_sock.inet_flags` (6.6+), or the
//!   `inet_sock.transparent` bitfield on older kernels;
//! * TIME_WAIT: the `inet_timewait_sock.tw_transparent` bitfield;
//! * request sockets (NEW_SYN_RECV): `inet_request_sock.no_srccheck`, copied from the
//!   listener's flag in `tcp_openreq_init`.

use proxy_common::SockOffsets;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_ENUM64: u32 = 19;

/// The BTF could not be read or lacks what the check needs.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("reading /sys/kernel/btf/vmlinux")]
    Read(#[source] std::io::Error),
    /// The data is not BTF, or is cut short.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A struct, member or enum constant the check relies on is missing.
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

struct Type {
    kind: u32,
    kind_flag: bool,
    name: u32,
    /// (name, bit offset, bitfield size or 0) for struct/union members.
    members: Vec<(u32, u32)>,
    /// For enums: (name, value).
    values: Vec<(u32, i64)>,
}

/// A parsed BTF blob: just enough to find members and enum constants by name.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux").map_err(BtfError::Read)?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF (the only kind the classifier is built for).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("no header"))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        // Type id 0 is void.
        let mut types = vec![Type {
            kind: 0,
            kind_flag: false,
            name: 0,
            members: Vec::new(),
            values: Vec::new(),
        }];
        let mut at = 0;
        while at < types_data.len() {
            let name = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                kind,
                kind_flag,
                name,
                members: Vec::new(),
                values: Vec::new(),
            };
            match kind {
                1 | 14 | 17 => at += 4, // INT, VAR, DECL_TAG
                3 => at += 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        ty.members
                            .push((u32_at(types_data, m)?, u32_at(types_data, m + 8)?));
                    }
                    at += vlen * 12;
                }
                KIND_ENUM => {
                    for i in 0..vlen {
                        let v = at + i * 8;
                        let value = u32_at(types_data, v + 4)? as i32;
                        ty.values.push((u32_at(types_data, v)?, i64::from(value)));
                    }
                    at += vlen * 8;
                }
                KIND_ENUM64 => {
                    for i in 0..vlen {
                        let v = at + i * 12;
                        let lo = u64::from(u32_at(types_data, v + 4)?);
                        let hi = u64::from(u32_at(types_data, v + 8)?);
                        ty.values
                            .push((u32_at(types_data, v)?, ((hi << 32) | lo) as i64));
                    }
                    at += vlen * 12;
                }
                13 => at += vlen * 8,      // FUNC_PROTO
                15 => at += vlen * 12,     // DATASEC
                2 | 7..=12 | 16 | 18 => {} // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Malformed("unknown type kind")),
            }
            types.push(ty);
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, offset: u32) -> &str {
        let start = offset as usize;
        let rest = self.strings.get(start..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn struct_by_name(&self, name: &str) -> Option<&Type> {
        self.types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && !t.members.is_empty() && self.name(t.name) == name)
    }

    /// Bit offset of a direct member of `struct name`.
    pub fn member_bit_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let ty = self
            .struct_by_name(name)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))?;
        ty.members
            .iter()
            .find(|(n, _)| self.name(*n) == member)
            // With kind_flag, the offset packs the bitfield size in the top 8 bits.
            .map(|(_, off)| {
                if ty.kind_flag {
                    off & 0x00ff_ffff
                } else {
                    *off
                }
            })
            .ok_or_else(|| BtfError::Missing(format!("member {name}.{member}")))
    }

    /// The value of an enum constant, in whichever enum it is declared.
    pub fn enum_value(&self, constant: &str) -> Result<i64, BtfError> {
        self.types
            .iter()
            .filter(|t| t.kind == KIND_ENUM || t.kind == KIND_ENUM64)
            .flat_map(|t| t.values.iter())
            .find(|(n, _)| self.name(*n) == constant)
            .map(|(_, v)| *v)
            .ok_or_else(|| BtfError::Missing(format!("enum constant {constant}")))
    }

    /// The byte offsets and bits of the transparent flag for the three socket kinds.
    pub fn sock_offsets(&self) -> Result<SockOffsets, BtfError> {
        let split = |bit: u32| (bit / 8, bit % 8);
        let (full_off, full_bit) = match self.member_bit_offset("inet_sock", "inet_flags") {
            Ok(flags) => {
                let bit = self.enum_value("INET_FLAGS_TRANSPARENT")?;
                let bit =
                    u32::try_from(bit).map_err(|_| BtfError::Malformed("negative flag bit"))?;
                split(flags + bit)
            }
            // Before 6.6 the flag was a bitfield of its own.
            Err(_) => split(self.member_bit_offset("inet_sock", "transparent")?),
        };
        let (tw_off, tw_bit) =
            split(self.member_bit_offset("inet_timewait_sock", "tw_transparent")?);
        let (req_off, req_bit) = split(self.member_bit_offset("inet_request_sock", "no_srccheck")?);
        Ok(SockOffsets {
            full_off,
            full_bit,
            tw_off,
            tw_bit,
            req_off,
            req_bit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_has_the_transparent_flag_where_expected() {
        // Every kernel this project supports has BTF; the offsets must be plausible
        // (inside the structs, which are a few hundred bytes to ~1.5 KiB).
        let btf = Btf::from_sys_fs().expect("vmlinux BTF");
        let o = btf.sock_offsets().expect("offsets");
        assert!(o.full_off > 100 && o.full_off < 2048, "{o:?}");
        assert!(o.tw_off > 0 && o.tw_off < 512, "{o:?}");
        assert!(o.req_off > 0 && o.req_off < 1024, "{o:?}");
        assert!(o.full_bit < 8 && o.tw_bit < 8 && o.req_bit < 8);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(Btf::parse(b"nope"), Err(BtfError::Malformed(_))));
        assert!(matches!(
            Btf::parse(&[0x9f, 0xeb, 1, 0]),
            Err(BtfError::Malformed(_))
        ));
    }
}
