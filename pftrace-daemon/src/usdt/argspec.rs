//! Parsing of x86-64 USDT argument strings (GNU as operand syntax, e.g.
//! `8@%rbp 8@%r12 -4@%eax`) into [`pftrace_common::UsdtArg`] locations.
//!
//! Each argument is `SIZE@OPERAND`. SIZE is 1, 2, 4 or 8 bytes, negative when
//! the value is signed. OPERAND is one of:
//! - `%reg`: a register of any width (`%rax`, `%eax`, `%ax`, `%al`, `%r8d`, ...);
//! - `$imm`: a constant, decimal or hex, possibly negative;
//! - `disp(%base)` or `(%base)`: memory at base + disp;
//! - `disp(%base,%index,scale)`, `(%base,%index)` ...: memory at
//!   base + index * scale + disp.
//!
//! The register width in the name does not matter: the value is read from the
//! full 64-bit register in `struct pt_regs` and truncated to SIZE (as libbpf
//! does). The 8-bit high registers (`%ah`, `%bh`, `%ch`, `%dh`) would need a
//! shift that `UsdtArg` cannot express and are rejected, as in libbpf.

use pftrace_common::{USDT_ARGS, UsdtArg, UsdtSpec, arg_kind};

use super::error::{Result, UsdtError};

/// Byte offsets in x86-64 `struct pt_regs` and every name of each register.
const REGISTERS: &[(u16, &[&str])] = &[
    (0, &["r15", "r15d", "r15w", "r15b"]),
    (8, &["r14", "r14d", "r14w", "r14b"]),
    (16, &["r13", "r13d", "r13w", "r13b"]),
    (24, &["r12", "r12d", "r12w", "r12b"]),
    (32, &["rbp", "ebp", "bp", "bpl"]),
    (40, &["rbx", "ebx", "bx", "bl"]),
    (48, &["r11", "r11d", "r11w", "r11b"]),
    (56, &["r10", "r10d", "r10w", "r10b"]),
    (64, &["r9", "r9d", "r9w", "r9b"]),
    (72, &["r8", "r8d", "r8w", "r8b"]),
    (80, &["rax", "eax", "ax", "al"]),
    (88, &["rcx", "ecx", "cx", "cl"]),
    (96, &["rdx", "edx", "dx", "dl"]),
    (104, &["rsi", "esi", "si", "sil"]),
    (112, &["rdi", "edi", "di", "dil"]),
    (128, &["rip", "eip"]),
    (152, &["rsp", "esp", "sp", "spl"]),
];

/// Byte offset in x86-64 `struct pt_regs` of the register named `name`
/// (without the `%`), for every 64/32/16/8-bit name; `None` if unknown.
pub fn reg_offset(name: &str) -> Option<u16> {
    REGISTERS.iter().find(|(_, names)| names.contains(&name)).map(|&(off, _)| off)
}

/// Parses one argument such as `-4@%eax`, `8@-24(%rbp)` or `4@$0x10`.
pub fn parse_arg(arg: &str) -> Result<UsdtArg> {
    let bad = |reason: String| UsdtError::BadArg { arg: arg.to_string(), reason };
    let (size_text, operand) = arg
        .split_once('@')
        .ok_or_else(|| bad("no '@' between size and operand (expected e.g. '8@%rax')".into()))?;
    let (size, signed) = parse_size(size_text)
        .ok_or_else(|| bad(format!("size '{size_text}' is not one of 1, 2, 4, 8 or -1, -2, -4, -8")))?;
    let mut out = UsdtArg { size, signed: u8::from(signed), bitshift: 64 - 8 * size, ..UsdtArg::default() };
    if operand.contains(':') {
        return Err(bad(format!("segment-relative operand '{operand}' is not supported")));
    }
    if let Some(imm) = operand.strip_prefix('$') {
        out.kind = arg_kind::CONST;
        out.val_off = parse_int(imm).ok_or_else(|| {
            bad(format!(
                "constant '${imm}' is not a decimal or hex integer (symbolic constants are not supported)"
            ))
        })?;
    } else if let Some(reg) = operand.strip_prefix('%') {
        out.kind = arg_kind::REG;
        out.reg_off = register(reg).map_err(bad)?;
    } else {
        parse_memory(operand, &mut out).map_err(bad)?;
    }
    Ok(out)
}

/// Parses a whole argument string (arguments separated by blanks). An empty
/// string gives no arguments.
pub fn parse_args(args: &str) -> Result<Vec<UsdtArg>> {
    args.split_ascii_whitespace().map(parse_arg).collect()
}

/// Builds the spec of the first [`USDT_ARGS`] arguments; `args_text` is the
/// argument string they came from, quoted in the error if there are too few.
pub fn spec_from_args(args: &[UsdtArg], args_text: &str) -> Result<UsdtSpec> {
    let first: [UsdtArg; USDT_ARGS] =
        args.get(..USDT_ARGS).and_then(|s| s.try_into().ok()).ok_or_else(|| UsdtError::TooFewArgs {
            args: args_text.to_string(),
            found: args.len(),
            needed: USDT_ARGS,
        })?;
    Ok(UsdtSpec { args: first, frame: Default::default() })
}

/// Parses an argument string and builds the spec of its first [`USDT_ARGS`]
/// arguments (extra arguments are ignored).
pub fn parse_spec(args: &str) -> Result<UsdtSpec> {
    spec_from_args(&parse_args(args)?, args)
}

/// `8` -> (8, unsigned), `-4` -> (4, signed); `None` for anything else.
fn parse_size(text: &str) -> Option<(u8, bool)> {
    let (signed, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let size = match digits {
        "1" => 1,
        "2" => 2,
        "4" => 4,
        "8" => 8,
        _ => return None,
    };
    Some((size, signed))
}

/// A register name (after `%`) to its pt_regs offset, or why it is refused.
fn register(name: &str) -> Result<u16, String> {
    if matches!(name, "ah" | "bh" | "ch" | "dh") {
        return Err(format!(
            "8-bit high register '%{name}' is not supported (its value is bits 8-15 of a register)"
        ));
    }
    reg_offset(name).ok_or_else(|| format!("unknown register '%{name}'"))
}

/// `disp(%base)`, `(%base)`, `disp(%base,%index,scale)`, `(%base,%index)`.
fn parse_memory(operand: &str, out: &mut UsdtArg) -> Result<(), String> {
    let (disp, rest) = operand.split_once('(').ok_or_else(|| {
        format!("operand '{operand}' is not a register (%reg), a constant ($imm) or a memory reference (disp(%reg))")
    })?;
    let inner =
        rest.strip_suffix(')').ok_or_else(|| format!("memory operand '{operand}' does not end with ')'"))?;
    out.val_off = if disp.is_empty() {
        0
    } else {
        parse_int(disp).ok_or_else(|| {
            format!(
                "displacement '{disp}' is not a decimal or hex integer (symbolic addresses are not supported)"
            )
        })?
    };
    let parts: Vec<&str> = inner.split(',').collect();
    let base = parts[0];
    if base.is_empty() {
        return Err(format!("memory operand '{operand}' has no base register (not supported)"));
    }
    out.reg_off = mem_register(base, operand)?;
    match parts[1..] {
        [] => out.kind = arg_kind::REG_DEREF,
        [index] | [index, ""] => {
            out.kind = arg_kind::SIB_DEREF;
            out.idx_reg_off = mem_register(index, operand)?;
        }
        [index, scale] => {
            out.kind = arg_kind::SIB_DEREF;
            out.idx_reg_off = mem_register(index, operand)?;
            out.scale_shift = match scale {
                "1" => 0,
                "2" => 1,
                "4" => 2,
                "8" => 3,
                _ => {
                    return Err(format!("scale '{scale}' in '{operand}' is not 1, 2, 4 or 8"));
                }
            };
        }
        _ => return Err(format!("memory operand '{operand}' has too many ',' parts")),
    }
    Ok(())
}

/// A `%reg` inside a memory operand.
fn mem_register(text: &str, operand: &str) -> Result<u16, String> {
    let name = text
        .strip_prefix('%')
        .ok_or_else(|| format!("'{text}' in '{operand}' is not a register (no '%')"))?;
    register(name)
}

/// Decimal or `0x` hex integer with optional sign, as a two's complement u64.
/// Positive values may use the full u64 range; negative ones down to -2^63.
fn parse_int(text: &str) -> Option<u64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let magnitude = if let Some(hex) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()?
    } else {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse::<u64>().ok()?
    };
    if !negative {
        Some(magnitude)
    } else if magnitude <= 1 << 63 {
        Some(magnitude.wrapping_neg())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(size: u8, signed: bool, reg_off: u16) -> UsdtArg {
        UsdtArg {
            kind: arg_kind::REG,
            reg_off,
            size,
            signed: u8::from(signed),
            bitshift: 64 - 8 * size,
            ..UsdtArg::default()
        }
    }

    fn deref(size: u8, signed: bool, reg_off: u16, off: i64) -> UsdtArg {
        UsdtArg { kind: arg_kind::REG_DEREF, val_off: off as u64, ..reg(size, signed, reg_off) }
    }

    fn constant(size: u8, signed: bool, value: i64) -> UsdtArg {
        UsdtArg { kind: arg_kind::CONST, val_off: value as u64, ..reg(size, signed, 0) }
    }

    fn err(arg: &str) -> String {
        parse_arg(arg).unwrap_err().to_string()
    }

    #[test]
    fn every_register_name_of_every_width() {
        // (pt_regs offset, 64-, 32-, 16-, 8-bit name), written out independently
        // of the table above.
        let expected: &[(u16, &str, &str, &str, &str)] = &[
            (80, "rax", "eax", "ax", "al"),
            (40, "rbx", "ebx", "bx", "bl"),
            (88, "rcx", "ecx", "cx", "cl"),
            (96, "rdx", "edx", "dx", "dl"),
            (104, "rsi", "esi", "si", "sil"),
            (112, "rdi", "edi", "di", "dil"),
            (32, "rbp", "ebp", "bp", "bpl"),
            (152, "rsp", "esp", "sp", "spl"),
            (72, "r8", "r8d", "r8w", "r8b"),
            (64, "r9", "r9d", "r9w", "r9b"),
            (56, "r10", "r10d", "r10w", "r10b"),
            (48, "r11", "r11d", "r11w", "r11b"),
            (24, "r12", "r12d", "r12w", "r12b"),
            (16, "r13", "r13d", "r13w", "r13b"),
            (8, "r14", "r14d", "r14w", "r14b"),
            (0, "r15", "r15d", "r15w", "r15b"),
        ];
        for &(off, q, d, w, b) in expected {
            assert_eq!(parse_arg(&format!("8@%{q}")).unwrap(), reg(8, false, off), "{q}");
            assert_eq!(parse_arg(&format!("-4@%{d}")).unwrap(), reg(4, true, off), "{d}");
            assert_eq!(parse_arg(&format!("2@%{w}")).unwrap(), reg(2, false, off), "{w}");
            assert_eq!(parse_arg(&format!("-1@%{b}")).unwrap(), reg(1, true, off), "{b}");
        }
        assert_eq!(parse_arg("8@%rip").unwrap(), reg(8, false, 128));
        assert_eq!(reg_offset("eip"), Some(128));
        assert_eq!(reg_offset("xmm0"), None);
    }

    #[test]
    fn sizes_signedness_and_bitshift() {
        for (text, size, signed, shift) in [
            ("1", 1, false, 56),
            ("2", 2, false, 48),
            ("4", 4, false, 32),
            ("8", 8, false, 0),
            ("-1", 1, true, 56),
            ("-2", 2, true, 48),
            ("-4", 4, true, 32),
            ("-8", 8, true, 0),
        ] {
            let a = parse_arg(&format!("{text}@%rdi")).unwrap();
            assert_eq!((a.size, a.signed, a.bitshift), (size, u8::from(signed), shift), "{text}");
        }
    }

    #[test]
    fn memory_operands() {
        assert_eq!(parse_arg("-4@112(%rsp)").unwrap(), deref(4, true, 152, 112));
        assert_eq!(parse_arg("8@-24(%rbp)").unwrap(), deref(8, false, 32, -24));
        assert_eq!(parse_arg("4@0x10(%r12)").unwrap(), deref(4, false, 24, 0x10));
        assert_eq!(parse_arg("-2@-0x1c(%rbx)").unwrap(), deref(2, true, 40, -0x1c));
        assert_eq!(parse_arg("8@(%rsp)").unwrap(), deref(8, false, 152, 0));
        assert_eq!(parse_arg("1@0(%r9d)").unwrap(), deref(1, false, 64, 0));
        assert_eq!(parse_arg("8@16(%rip)").unwrap(), deref(8, false, 128, 16));
    }

    #[test]
    fn sib_operands() {
        let a = parse_arg("8@-16(%rax,%rbx,8)").unwrap();
        assert_eq!(
            a,
            UsdtArg {
                kind: arg_kind::SIB_DEREF,
                val_off: -16i64 as u64,
                reg_off: 80,
                idx_reg_off: 40,
                scale_shift: 3,
                ..reg(8, false, 0)
            }
        );
        let b = parse_arg("-4@(%rdi,%r13,4)").unwrap();
        assert_eq!(
            (b.kind, b.val_off, b.reg_off, b.idx_reg_off, b.scale_shift),
            (arg_kind::SIB_DEREF, 0, 112, 16, 2)
        );
        let c = parse_arg("2@0x20(%r8,%rcx,2)").unwrap();
        assert_eq!((c.val_off, c.reg_off, c.idx_reg_off, c.scale_shift), (0x20, 72, 88, 1));
        let d = parse_arg("1@(%rsi,%rdx)").unwrap();
        assert_eq!((d.kind, d.reg_off, d.idx_reg_off, d.scale_shift), (arg_kind::SIB_DEREF, 104, 96, 0));
        let e = parse_arg("8@8(%rsp,%r15,1)").unwrap();
        assert_eq!((e.val_off, e.reg_off, e.idx_reg_off, e.scale_shift), (8, 152, 0, 0));
    }

    #[test]
    fn constants() {
        assert_eq!(parse_arg("4@$71").unwrap(), constant(4, false, 71));
        assert_eq!(parse_arg("-4@$-1").unwrap(), constant(4, true, -1));
        assert_eq!(parse_arg("8@$0x7fff").unwrap(), constant(8, false, 0x7fff));
        assert_eq!(parse_arg("-8@$-0x10").unwrap(), constant(8, true, -16));
        assert_eq!(parse_arg("1@$0").unwrap(), constant(1, false, 0));
        assert_eq!(parse_arg("8@$0xffffffffffffffff").unwrap().val_off, u64::MAX);
        assert_eq!(parse_arg("-8@$-9223372036854775808").unwrap().val_off, i64::MIN as u64);
    }

    #[test]
    fn argument_strings_from_the_field_notes() {
        // CPython 3.9 built --with-dtrace: function__entry.
        assert_eq!(
            parse_args("8@%r12 8@%r14 -4@%eax").unwrap(),
            vec![reg(8, false, 24), reg(8, false, 8), reg(4, true, 80)]
        );
        // Debian 12's python3.11: function__entry and function__return.
        let spec = parse_spec("8@%rbp 8@%r12 -4@%eax").unwrap();
        assert_eq!(spec.args, [reg(8, false, 32), reg(8, false, 24), reg(4, true, 80)]);
        // python3.11 gc__start.
        assert_eq!(parse_args("-4@112(%rsp)").unwrap(), vec![deref(4, true, 152, 112)]);
    }

    #[test]
    fn whole_strings_and_specs() {
        assert_eq!(parse_args("").unwrap(), vec![]);
        assert_eq!(parse_args("  8@%rax   -4@$3 ").unwrap().len(), 2);
        // Extra arguments are ignored by the spec.
        let spec = parse_spec("8@%rdi 8@%rsi 4@%edx 8@%rcx").unwrap();
        assert_eq!(spec.args[2], reg(4, false, 96));
        assert_eq!(
            parse_spec("8@%rbx 8@%r15").unwrap_err().to_string(),
            "USDT argument string '8@%rbx 8@%r15' has 2 argument(s), 3 needed"
        );
        // A bad argument inside a string is reported by its own text.
        assert_eq!(
            parse_args("8@%rbp 8@%r99 -4@%eax").unwrap_err().to_string(),
            "USDT argument '8@%r99': unknown register '%r99'"
        );
    }

    #[test]
    fn bad_inputs_are_explained() {
        assert_eq!(err("8@%foo"), "USDT argument '8@%foo': unknown register '%foo'");
        assert_eq!(
            err("1@%ah"),
            "USDT argument '1@%ah': 8-bit high register '%ah' is not supported (its value is bits 8-15 of a register)"
        );
        assert_eq!(
            err("3@%rax"),
            "USDT argument '3@%rax': size '3' is not one of 1, 2, 4, 8 or -1, -2, -4, -8"
        );
        assert_eq!(
            err("16@%rax"),
            "USDT argument '16@%rax': size '16' is not one of 1, 2, 4, 8 or -1, -2, -4, -8"
        );
        assert_eq!(err("@%rax"), "USDT argument '@%rax': size '' is not one of 1, 2, 4, 8 or -1, -2, -4, -8");
        assert_eq!(
            err("%rax"),
            "USDT argument '%rax': no '@' between size and operand (expected e.g. '8@%rax')"
        );
        assert_eq!(
            err("garbage"),
            "USDT argument 'garbage': no '@' between size and operand (expected e.g. '8@%rax')"
        );
        assert_eq!(
            err("8@rax"),
            "USDT argument '8@rax': operand 'rax' is not a register (%reg), a constant ($imm) or a memory reference (disp(%reg))"
        );
        assert_eq!(
            err("8@$foo"),
            "USDT argument '8@$foo': constant '$foo' is not a decimal or hex integer (symbolic constants are not supported)"
        );
        assert_eq!(
            err("8@$0x"),
            "USDT argument '8@$0x': constant '$0x' is not a decimal or hex integer (symbolic constants are not supported)"
        );
        assert_eq!(
            err("8@counter(%rip)"),
            "USDT argument '8@counter(%rip)': displacement 'counter' is not a decimal or hex integer (symbolic addresses are not supported)"
        );
        assert_eq!(
            err("8@8(%rsp"),
            "USDT argument '8@8(%rsp': memory operand '8(%rsp' does not end with ')'"
        );
        assert_eq!(err("8@8(rsp)"), "USDT argument '8@8(rsp)': 'rsp' in '8(rsp)' is not a register (no '%')");
        assert_eq!(
            err("8@(,%rax,8)"),
            "USDT argument '8@(,%rax,8)': memory operand '(,%rax,8)' has no base register (not supported)"
        );
        assert_eq!(
            err("8@(%rax,%rbx,3)"),
            "USDT argument '8@(%rax,%rbx,3)': scale '3' in '(%rax,%rbx,3)' is not 1, 2, 4 or 8"
        );
        assert_eq!(
            err("8@(%rax,%rbx,8,1)"),
            "USDT argument '8@(%rax,%rbx,8,1)': memory operand '(%rax,%rbx,8,1)' has too many ',' parts"
        );
        assert_eq!(err("8@(%rax,%xmm1,8)"), "USDT argument '8@(%rax,%xmm1,8)': unknown register '%xmm1'");
        assert_eq!(
            err("8@%fs:0x28"),
            "USDT argument '8@%fs:0x28': segment-relative operand '%fs:0x28' is not supported"
        );
        assert!(err("8@$-0x8000000000000001").contains("not a decimal or hex integer"));
        assert!(err("8@$+5").contains("not a decimal or hex integer"));
    }
}
