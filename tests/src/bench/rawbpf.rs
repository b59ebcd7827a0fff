//! A few raw `bpf(2)` calls for the benchmark's helper programs, which are not part of the
//! project's eBPF object: a packet generator (writes a template frame, optionally with a
//! random source address and port, and returns `XDP_TX`) and a sink (`XDP_DROP`). They are
//! assembled here from instructions, loaded with `BPF_PROG_LOAD`, attached with
//! `BPF_LINK_CREATE` (the link detaches when its fd closes) and run with
//! `BPF_PROG_TEST_RUN` in live-frames mode.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Result};

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_LINK_CREATE: i64 = 28;
const BPF_LINK_UPDATE: i64 = 29;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;

pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

/// One eBPF instruction.
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
fn mov_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
fn rsh_imm(dst: u8, imm: i32) -> Insn {
    insn(0x77, dst, 0, 0, imm)
}
fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm)
}
fn st_h(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x6a, dst, 0, off, imm)
}
fn st_b(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x72, dst, 0, off, imm)
}
fn stx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x63, dst, src, off, 0)
}
fn stx_h(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x6b, dst, src, off, 0)
}
fn jgt_reg(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x2d, dst, src, off, 0)
}
fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}

/// `return action;`
pub fn constant_program(action: i32) -> Vec<u8> {
    encode(&[mov_imm(0, action), exit()])
}

/// Where the generator puts random bytes: a 4-byte field and a 2-byte field of the frame
/// (e.g. the IPv4 source address and the TCP source port), so every frame is a new flow.
#[derive(Clone, Copy)]
pub struct Randomize {
    pub word_at: usize,
    pub half_at: usize,
}

/// A generator: writes `template` over the start of the frame, optionally randomizes two
/// fields, and returns `XDP_TX`. Live frames are recycled without being reset, and the
/// program under test rewrites them, so the template is written on every run.
pub fn generator_program(template: &[u8], randomize: Option<Randomize>) -> Vec<u8> {
    let len = template.len() as i32;
    let mut body = Vec::new();
    let mut off = 0usize;
    while off < template.len() {
        let rest = template.len() - off;
        if rest >= 4 {
            let w = i32::from_le_bytes(template[off..off + 4].try_into().unwrap());
            body.push(st_w(7, off as i16, w));
            off += 4;
        } else if rest >= 2 {
            let h = u16::from_le_bytes(template[off..off + 2].try_into().unwrap());
            body.push(st_h(7, off as i16, h as i32));
            off += 2;
        } else {
            body.push(st_b(7, off as i16, template[off] as i32));
            off += 1;
        }
    }
    if let Some(r) = randomize {
        body.push(call(BPF_FUNC_GET_PRANDOM_U32));
        body.push(stx_w(7, 0, r.word_at as i16));
        body.push(rsh_imm(0, 16));
        body.push(stx_h(7, 0, r.half_at as i16));
    }
    body.push(mov_imm(0, XDP_TX));
    body.push(exit());
    let mut prog = vec![
        mov_reg(6, 1),
        ldx_w(7, 6, 0), // data
        ldx_w(8, 6, 4), // data_end
        mov_reg(2, 7),
        add_imm(2, len),
    ];
    // if data + len > data_end: pass (skip the body)
    prog.push(jgt_reg(2, 8, body.len() as i16));
    prog.extend(body);
    prog.push(mov_imm(0, XDP_PASS));
    prog.push(exit());
    encode(&prog)
}

fn encode(insns: &[Insn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(insns.len() * 8);
    for i in insns {
        out.push(i.code);
        out.push(i.regs);
        out.extend_from_slice(&i.off.to_le_bytes());
        out.extend_from_slice(&i.imm.to_le_bytes());
    }
    out
}

fn put32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get32(attr: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(attr[at..at + 4].try_into().unwrap())
}

fn bpf(cmd: i64, attr: &mut [u8]) -> std::io::Result<i64> {
    // SAFETY: attr is a zero-padded `union bpf_attr` prefix of the given size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads an XDP program from encoded instructions.
pub fn load_xdp(name: &str, code: &[u8]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    for level in [0u32, 1] {
        let mut attr = [0u8; 128];
        put32(&mut attr, 0, BPF_PROG_TYPE_XDP);
        put32(&mut attr, 4, (code.len() / 8) as u32);
        put64(&mut attr, 8, code.as_ptr() as u64);
        put64(&mut attr, 16, license.as_ptr() as u64);
        if level > 0 {
            put32(&mut attr, 24, level);
            put32(&mut attr, 28, log.len() as u32);
            put64(&mut attr, 32, log.as_mut_ptr() as u64);
        }
        let n = name.as_bytes();
        let n = &n[..n.len().min(15)];
        attr[48..48 + n.len()].copy_from_slice(n);
        put32(&mut attr, 68, BPF_XDP);
        match bpf(BPF_PROG_LOAD, &mut attr) {
            // SAFETY: a new fd the kernel gave us.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
            Err(e) if level == 0 => {
                let _ = e;
                continue;
            }
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "loading the helper program {name}: {e}\n{}",
                    String::from_utf8_lossy(&log[..end])
                );
            }
        }
    }
    unreachable!()
}

/// Attaches an XDP program to an interface of the calling thread's network namespace.
/// The program stays attached until the returned link fd is closed.
pub fn attach_xdp(prog: RawFd, ifindex: u32, flags: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; 64];
    put32(&mut attr, 0, prog as u32);
    put32(&mut attr, 4, ifindex);
    put32(&mut attr, 8, BPF_XDP);
    put32(&mut attr, 12, flags);
    match bpf(BPF_LINK_CREATE, &mut attr) {
        // SAFETY: a new fd the kernel gave us.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(e) => bail!("attaching an XDP program to ifindex {ifindex}: {e}"),
    }
}

/// Replaces the program of an XDP link in place (the device keeps its XDP state).
pub fn update_link(link: &OwnedFd, prog: RawFd) -> Result<()> {
    let mut attr = [0u8; 64];
    put32(&mut attr, 0, link.as_raw_fd() as u32);
    put32(&mut attr, 4, prog as u32);
    match bpf(BPF_LINK_UPDATE, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) => bail!("replacing the program of an XDP link: {e}"),
    }
}

/// Runs an XDP program in live-frames mode: `repeat` frames made from `frame`, as if
/// received on `ifindex` (of the calling thread's namespace), in batches of `batch`; the
/// verdicts are carried out (XDP_TX sends the frame out of `ifindex`).
pub fn run_live(prog: RawFd, frame: &[u8], ifindex: u32, repeat: u32, batch: u32) -> Result<()> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut attr = [0u8; 80];
    put32(&mut attr, 0, prog as u32);
    put32(&mut attr, 8, frame.len() as u32);
    put64(&mut attr, 16, frame.as_ptr() as u64);
    put32(&mut attr, 32, repeat);
    put32(&mut attr, 40, std::mem::size_of_val(&md) as u32);
    put64(&mut attr, 48, md.as_ptr() as u64);
    put32(&mut attr, 64, BPF_F_TEST_XDP_LIVE_FRAMES);
    put32(&mut attr, 72, batch);
    match bpf(BPF_PROG_TEST_RUN, &mut attr) {
        Ok(_) => {
            let _retval = get32(&attr, 4);
            Ok(())
        }
        Err(e) => bail!("BPF_PROG_TEST_RUN (live frames) on ifindex {ifindex}: {e}"),
    }
}
