//! Field offsets of kernel structs, resolved from the running kernel's BTF.
//!
//! Rust eBPF programs cannot use CO-RE relocations, so they read kernel structs with
//! `bpf_probe_read_kernel` at offsets that this module finds in `/sys/kernel/btf/vmlinux`
//! when the tracer starts. Anonymous unions and structs (common in `struct sock_common`)
//! are searched transparently.

use std::{collections::HashMap, path::Path};

use btf_rs::{Btf, Member, Struct, Type};
use tracer_common::{ConntrackOffsets, DropOffsets, SkbOffsets, SockOffsets, nf_tuple};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF has no enum {0}")]
    NoEnum(String),
    #[error("kernel BTF: unexpected layout: {0}")]
    Layout(String),
    #[error("kernel BTF: struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
    #[error("kernel BTF: {strukt}.{field} is a bitfield or not byte-aligned")]
    Unaligned { strukt: String, field: String },
}

/// The running kernel's type information.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    /// The types of a kernel module (`/sys/kernel/btf/<module>`) on top of these, for
    /// structs that live in modules (`nf_conn` when conntrack is a module, as on AKS).
    pub fn with_module(&self, module: &str) -> Result<Self, BtfError> {
        let path = Path::new("/sys/kernel/btf").join(module);
        let btf = Btf::from_split_file(&path, &self.btf).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    /// Byte offset of `path` (a field, then fields of that field's type…) in `strukt`.
    pub fn offset_of(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut current = self.find_struct(strukt)?;
        let mut bits = 0u32;
        for (depth, field) in path.iter().enumerate() {
            let no_field = || BtfError::NoField {
                strukt: strukt.to_owned(),
                field: path[..=depth].join("."),
            };
            let (offset, member) = self.find_member(&current, field).ok_or_else(no_field)?;
            bits += offset;
            if depth + 1 < path.len() {
                current = self.struct_of(&member).ok_or_else(no_field)?;
            } else if member.bitfield_size().is_some_and(|size| size != 0) {
                return Err(BtfError::Unaligned {
                    strukt: strukt.to_owned(),
                    field: path.join("."),
                });
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Unaligned {
                strukt: strukt.to_owned(),
                field: path.join("."),
            });
        }
        Ok(bits / 8)
    }

    /// Offsets of the `struct sock` and `struct tcp_sock` fields the handshake and drop
    /// tracepoints read, and of the path from a socket to its cgroup's id.
    pub fn sock_offsets(&self) -> Result<SockOffsets, BtfError> {
        let field = |name| self.offset_of("sock", &["__sk_common", name]);
        // tcp_sock starts with its inet_connection_sock, which starts with the sock.
        Ok(SockOffsets {
            family: field("skc_family")?,
            num: field("skc_num")?,
            dport: field("skc_dport")?,
            rcv_saddr: field("skc_rcv_saddr")?,
            daddr: field("skc_daddr")?,
            v6_rcv_saddr: field("skc_v6_rcv_saddr")?,
            v6_daddr: field("skc_v6_daddr")?,
            err: self.offset_of("sock", &["sk_err"])?,
            err_soft: self.offset_of("sock", &["sk_err_soft"])?,
            total_retrans: self.offset_of("tcp_sock", &["total_retrans"])?,
            cookie: field("skc_cookie")?,
            state: field("skc_state")?,
            protocol: self.offset_of("sock", &["sk_protocol"])?,
            rcv_nxt: self.offset_of("tcp_sock", &["rcv_nxt"])?,
            snd_una: self.offset_of("tcp_sock", &["snd_una"])?,
            cgroup: self.offset_of("sock", &["sk_cgrp_data", "cgroup"])?,
            cgroup_kn: self.offset_of("cgroup", &["kn"])?,
            kn_id: self.offset_of("kernfs_node", &["id"])?,
            cgroup_level: self.offset_of("cgroup", &["level"])?,
            cgroup_ancestors: self.offset_of("cgroup", &["ancestors"])?,
        })
    }

    /// Offsets of the `struct sk_buff` fields used to find a packet's headers.
    pub fn skb_offsets(&self) -> Result<SkbOffsets, BtfError> {
        Ok(SkbOffsets {
            head: self.offset_of("sk_buff", &["head"])?,
            network_header: self.offset_of("sk_buff", &["network_header"])?,
            transport_header: self.offset_of("sk_buff", &["transport_header"])?,
            _pad: 0,
        })
    }

    /// Where a packet's network namespace inode is (`skb->dev->nd_net.net->ns.inum`).
    pub fn drop_offsets(&self) -> Result<DropOffsets, BtfError> {
        Ok(DropOffsets {
            skb_dev: self.offset_of("sk_buff", &["dev"])?,
            dev_net: self.offset_of("net_device", &["nd_net", "net"])?,
            net_inum: self.offset_of("net", &["ns", "inum"])?,
            skb_sk: self.offset_of("sk_buff", &["sk"])?,
            sk_net: self.offset_of("sock", &["__sk_common", "skc_net", "net"])?,
        })
    }

    /// Where a packet's conntrack entry and tuples are. Checks that `struct
    /// nf_conntrack_tuple` is laid out as the drop program reads it.
    pub fn conntrack_offsets(&self) -> Result<ConntrackOffsets, BtfError> {
        let tuple_field = |path: &[&str]| self.offset_of("nf_conntrack_tuple", path);
        let expected = [
            (&["src", "u3"][..], nf_tuple::SRC_ADDR),
            (&["src", "u"][..], nf_tuple::SRC_PORT),
            (&["src", "l3num"][..], nf_tuple::L3NUM),
            (&["dst", "u3"][..], nf_tuple::DST_ADDR),
            (&["dst", "u"][..], nf_tuple::DST_PORT),
            (&["dst", "protonum"][..], nf_tuple::PROTONUM),
        ];
        for (path, offset) in expected {
            if tuple_field(path)? as usize != offset {
                return Err(BtfError::Layout(format!(
                    "nf_conntrack_tuple.{} is not at byte {offset}",
                    path.join(".")
                )));
            }
        }
        if self.find_struct("nf_conntrack_tuple")?.size() != nf_tuple::SIZE {
            return Err(BtfError::Layout(format!(
                "nf_conntrack_tuple is not {} bytes",
                nf_tuple::SIZE
            )));
        }
        Ok(ConntrackOffsets {
            nfct: self.offset_of("sk_buff", &["_nfct"])?,
            tuplehash: self.offset_of("nf_conn", &["tuplehash"])?,
            tuple: self.offset_of("nf_conntrack_tuple_hash", &["tuple"])?,
            status: self.offset_of("nf_conn", &["status"])?,
        })
    }

    /// Every member of the kernel enum `name`, by value (e.g. `skb_drop_reason`).
    pub fn enum_members(&self, name: &str) -> Result<HashMap<u32, String>, BtfError> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        let members = types
            .into_iter()
            .find_map(|t| match t {
                Type::Enum(e) => Some(e.members),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoEnum(name.to_owned()))?;
        Ok(members
            .iter()
            .map(|m| (m.val(), self.btf.resolve_name(m).unwrap_or_default()))
            .collect())
    }

    fn find_struct(&self, name: &str) -> Result<Struct, BtfError> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))
    }

    /// Finds a member by name, descending into anonymous structs and unions.
    /// Returns its bit offset from the start of `strukt`.
    fn find_member(&self, strukt: &Struct, name: &str) -> Option<(u32, Member)> {
        strukt.members.iter().find_map(|member| {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            if member_name == name {
                return Some((member.bit_offset(), member.clone()));
            }
            if !member_name.is_empty() {
                return None;
            }
            let inner = self.struct_of(member)?;
            let (offset, found) = self.find_member(&inner, name)?;
            Some((member.bit_offset() + offset, found))
        })
    }

    /// The struct or union type of a member, through typedefs and qualifiers.
    fn struct_of(&self, member: &Member) -> Option<Struct> {
        let mut current = self.btf.resolve_chained_type(member).ok()?;
        loop {
            current = match current {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(t) => self.btf.resolve_chained_type(&t).ok()?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(&t).ok()?
                }
                _ => return None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::KERNEL_BTF;

    /// Reads this machine's kernel BTF: the offsets must be those of the kernel's own
    /// `struct sock_common` layout, which has been stable for these fields since 4.x.
    #[test]
    fn resolves_sock_common_offsets_on_this_kernel() {
        if !Path::new(KERNEL_BTF).exists() {
            eprintln!("skipping: {KERNEL_BTF} absent");
            return;
        }
        let btf = KernelBtf::from_file(Path::new(KERNEL_BTF)).unwrap();
        let off = btf.sock_offsets().unwrap();
        // skc_daddr and skc_rcv_saddr open sock_common (anonymous union at offset 0).
        assert_eq!(off.daddr, 0);
        assert_eq!(off.rcv_saddr, 4);
        // skc_dport and skc_num share the 32-bit port pair at offset 12.
        assert_eq!(off.dport, 12);
        assert_eq!(off.num, 14);
        assert_eq!(off.family, 16);
        assert!(off.v6_daddr > off.family && off.v6_rcv_saddr == off.v6_daddr + 16);
        // Past sock_common (136 bytes on 64-bit kernels); tcp_sock is far larger.
        assert!(off.err > 136 && off.err_soft > 136, "{off:?}");
        assert!(off.total_retrans > off.err, "{off:?}");
        assert!(off.cookie > off.v6_rcv_saddr && off.cookie < 136, "{off:?}");
        // skc_state follows skc_family and skc_reuse bits in the same word.
        assert_eq!(off.state, off.family + 2, "{off:?}");
        assert!(off.protocol > 136 && off.rcv_nxt > off.err, "{off:?}");
        assert!(off.cgroup > 136, "{off:?}");
        // ancestors is struct cgroup's last member, a flexible array.
        assert!(off.cgroup_ancestors > off.cgroup_level, "{off:?}");
    }

    #[test]
    fn resolves_sk_buff_header_offsets_on_this_kernel() {
        if !Path::new(KERNEL_BTF).exists() {
            return;
        }
        let btf = KernelBtf::from_file(Path::new(KERNEL_BTF)).unwrap();
        let off = btf.skb_offsets().unwrap();
        // In the `headers` group: transport_header, network_header, mac_header, in order
        // (u16 each), after `head` comes later in the struct.
        assert_eq!(off.network_header, off.transport_header + 2, "{off:?}");
        assert!(off.head > off.network_header, "{off:?}");
    }

    #[test]
    fn drop_offsets_resolve() {
        if !Path::new(KERNEL_BTF).exists() {
            return;
        }
        let btf = KernelBtf::from_file(Path::new(KERNEL_BTF)).unwrap();
        let off = btf.drop_offsets().unwrap();
        assert!(off.skb_dev > 0 && off.net_inum > 0, "{off:?}");
    }

    #[test]
    fn conntrack_layout_matches_the_drop_program() {
        if !Path::new(KERNEL_BTF).exists() {
            return;
        }
        let btf = KernelBtf::from_file(Path::new(KERNEL_BTF)).unwrap();
        // This kernel has conntrack built in; elsewhere it comes from the module's BTF.
        let btf = match btf.conntrack_offsets() {
            Err(BtfError::NoStruct(_)) => btf.with_module("nf_conntrack").unwrap(),
            _ => btf,
        };
        let off = btf.conntrack_offsets().unwrap();
        // A tuple_hash is a list node (16 bytes), then the 40-byte tuple.
        assert_eq!(off.tuple, 16, "{off:?}");
        assert!(off.tuplehash > 0 && off.nfct > 0, "{off:?}");
        // `status` follows both directions' tuple hashes (it sits after them in every
        // kernel since 2.6).
        assert!(off.status >= off.tuplehash + 2 * 56, "{off:?}");
    }

    #[test]
    fn decodes_drop_reasons_by_name() {
        if !Path::new(KERNEL_BTF).exists() {
            return;
        }
        let btf = KernelBtf::from_file(Path::new(KERNEL_BTF)).unwrap();
        let reasons = btf.enum_members("skb_drop_reason").unwrap();
        let value_of = |name: &str| reasons.iter().find(|(_, n)| *n == name).map(|(v, _)| *v);
        // The numbering differs between kernels; the order of these three does not.
        let consumed = value_of("SKB_CONSUMED").unwrap();
        let not_specified = value_of("SKB_DROP_REASON_NOT_SPECIFIED").unwrap();
        let netfilter = value_of("SKB_DROP_REASON_NETFILTER_DROP").unwrap();
        assert!(consumed < not_specified && not_specified < netfilter);
        assert!(matches!(
            btf.enum_members("no_such_enum_xyz"),
            Err(BtfError::NoEnum(_))
        ));
    }

    #[test]
    fn unknown_struct_and_field_are_errors() {
        if !Path::new(KERNEL_BTF).exists() {
            return;
        }
        let btf = KernelBtf::from_file(Path::new(KERNEL_BTF)).unwrap();
        assert!(matches!(
            btf.offset_of("no_such_struct_xyz", &["a"]),
            Err(BtfError::NoStruct(_))
        ));
        let err = btf
            .offset_of("sock", &["__sk_common", "no_such_field"])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF: struct sock has no field __sk_common.no_such_field"
        );
    }
}
