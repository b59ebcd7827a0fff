//! Running the benchmark's traffic generator: the generator and sink are XDP programs of
//! the project's eBPF object (`anycast-ebpf/src/trivial.rs`); what aya does not offer is
//! done here with raw `bpf(2)` calls: attaching with `BPF_LINK_CREATE` (the link detaches
//! when its fd closes), swapping a link's program with `BPF_LINK_UPDATE`, and running the
//! generator with `BPF_PROG_TEST_RUN` in live-frames mode.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anycast_common::{
    maps::{self, GenFrame, GEN_FRAME_MAX},
    programs,
};
use anycast_ctl::dataplane::Dataplane;
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::Array,
    programs::{ProgramFd, Xdp},
};

const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_LINK_CREATE: i64 = 28;
const BPF_LINK_UPDATE: i64 = 29;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// The sink: XDP_DROP.
pub const SINK: &str = programs::BENCH_SINK;
/// The generator: writes the frame set by [`set_frame`] and transmits it (XDP_TX).
pub const GEN: &str = programs::BENCH_GEN;
/// As [`GEN`], with a random IPv4 source address and L4 source port in every frame.
pub const GEN_NEW_FLOW: &str = programs::BENCH_GEN_NEW;

/// Sets the frame the generator programs write.
pub fn set_frame(dp: &mut Dataplane, frame: &[u8]) -> Result<()> {
    if frame.is_empty() || frame.len() > GEN_FRAME_MAX {
        bail!(
            "the generator writes frames of 1 to {GEN_FRAME_MAX} bytes, not {}",
            frame.len()
        );
    }
    let mut value = GenFrame {
        len: frame.len() as u32,
        bytes: [0; GEN_FRAME_MAX],
    };
    value.bytes[..frame.len()].copy_from_slice(frame);
    let map = dp
        .ebpf
        .map_mut(maps::BENCH_FRAME)
        .ok_or_else(|| anyhow!("the eBPF object has no map {}", maps::BENCH_FRAME))?;
    let mut array: Array<_, GenFrame> = Array::try_from(map)?;
    array.set(0, value, 0)?;
    Ok(())
}

/// Loads one of the object's XDP programs (if not yet loaded) and returns a descriptor of it.
pub fn load(dp: &mut Dataplane, name: &str) -> Result<ProgramFd> {
    let prog: &mut Xdp = dp
        .ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(prog.fd()?.try_clone()?)
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
