//! Kernel symbol addresses from `/proc/kallsyms`: where functions start and end, so a
//! tracepoint's caller address can be recognised (the ICMP receive functions) or named
//! (where a packet was dropped).

use std::{fs, io};

/// A function's text range `[start, end)`: from its address to the next symbol's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolRange {
    pub start: u64,
    pub end: u64,
}

/// Symbols sorted by address.
#[derive(Default)]
pub struct Kallsyms {
    symbols: Vec<(u64, String)>,
}

impl Kallsyms {
    /// Reads `/proc/kallsyms`. Addresses are all zero without CAP_SYSLOG or with
    /// `kernel.kptr_restrict=2`; [`Kallsyms::range`] then finds nothing.
    pub fn load() -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string("/proc/kallsyms")?))
    }

    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let address = u64::from_str_radix(fields.next()?, 16).ok()?;
                let _kind = fields.next()?;
                let name = fields.next()?;
                (address != 0).then(|| (address, name.to_owned()))
            })
            .collect();
        symbols.sort_unstable();
        Self { symbols }
    }

    /// The text range of function `name`.
    pub fn range(&self, name: &str) -> Option<SymbolRange> {
        let start = self.symbols.iter().find(|(_, n)| n == name)?.0;
        let index = self
            .symbols
            .partition_point(|(address, _)| *address <= start);
        let end = self.symbols.get(index)?.0;
        Some(SymbolRange { start, end })
    }

    /// `function+0xoffset` for an address inside kernel text.
    pub fn symbolize(&self, address: u64) -> Option<String> {
        let index = self.symbols.partition_point(|(a, _)| *a <= address);
        let (start, name) = self.symbols.get(index.checked_sub(1)?)?;
        Some(format!("{name}+{:#x}", address - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff8204ed00 t icmp_discard
ffffffff8204edb0 T icmp_rcv
ffffffff8204edb0 T __pfx_alias_at_same_address
ffffffff8204f2a0 T icmp_err
ffffffff8210ccb0 t icmpv6_rcv\t[ipv6]
0000000000000000 A fixed_percpu_data
ffffffff8210d000 t icmpv6_err\t[ipv6]
";

    #[test]
    fn ranges_end_at_the_next_higher_symbol() {
        let syms = Kallsyms::parse(SAMPLE);
        assert_eq!(
            syms.range("icmp_rcv"),
            Some(SymbolRange {
                start: 0xffffffff8204edb0,
                end: 0xffffffff8204f2a0
            })
        );
        assert_eq!(syms.range("icmpv6_rcv").unwrap().end, 0xffffffff8210d000);
        assert_eq!(syms.range("icmpv6_err"), None, "last symbol has no end");
        assert_eq!(syms.range("no_such_function"), None);
    }

    #[test]
    fn symbolizes_addresses() {
        let syms = Kallsyms::parse(SAMPLE);
        assert_eq!(
            syms.symbolize(0xffffffff8204edc4).as_deref(),
            Some("icmp_rcv+0x14")
        );
        assert_eq!(syms.symbolize(0x10), None);
    }

    #[test]
    fn restricted_kallsyms_has_no_ranges() {
        let restricted = "0000000000000000 T icmp_rcv\n0000000000000000 T icmp_err\n";
        assert_eq!(Kallsyms::parse(restricted).range("icmp_rcv"), None);
    }
}
