//! Trivial programs: a pass-through for veth peers, and the benchmark's baseline forwarder,
//! traffic generator and sink (`anycast-bench`, part 2).
use anycast_common::maps::{self, GenFrame, GEN_FRAME_MAX};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

/// Lets frames through. Attached to a veth peer so that frames the agent sends with
/// XDP_TX/XDP_REDIRECT in native mode are received there.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark baseline: swap the MAC addresses and send the frame back.
#[xdp]
pub fn xdp_tx_swap(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let p = data as *mut [u8; 6];
    // SAFETY: bounds checked above.
    unsafe {
        let dst = p.read_unaligned();
        let src = p.add(1).read_unaligned();
        p.write_unaligned(src);
        p.add(1).write_unaligned(dst);
    }
    xdp_action::XDP_TX
}

/// Benchmark sink: drops every frame (the interface's rx_packets counter counts them).
#[xdp]
pub fn bench_sink(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

const FRAME_MAX: usize = GEN_FRAME_MAX;

#[map]
static BENCH_FRAME: Array<GenFrame> = Array::with_max_entries(1, 0);
map_name!(BENCH_FRAME, maps::BENCH_FRAME);

/// Benchmark generator, run with BPF_PROG_TEST_RUN in live-frames mode: writes
/// `BENCH_FRAME` over the start of the frame and transmits it (XDP_TX). Live frames are
/// recycled without being reset and the program under test rewrites them, so the frame is
/// written on every run.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    write_frame(&ctx, false)
}

/// As [`bench_gen`], and every frame is a new flow: a random IPv4 source address and L4
/// source port (the frame must be IPv4 without VLAN tag or IP options).
#[xdp]
pub fn bench_gen_new(ctx: XdpContext) -> u32 {
    write_frame(&ctx, true)
}

/// IPv4 source address and L4 source port, in an untagged frame without IP options.
const IPV4_SRC: usize = 14 + 12;
const L4_SPORT: usize = 14 + 20;

#[inline(always)]
fn write_frame(ctx: &XdpContext, new_flow: bool) -> u32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let len = frame.len as usize;
    if len == 0 || len > FRAME_MAX {
        return xdp_action::XDP_PASS;
    }
    // Equal to `len`, in a form whose range 1..=FRAME_MAX the verifier sees.
    let n = ((len - 1) & (FRAME_MAX - 1)) + 1;
    // SAFETY: the helper checks the frame's bounds; the source is `n` bytes of the map value.
    let r = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            frame.bytes.as_ptr() as *mut core::ffi::c_void,
            n as u32,
        )
    };
    if r != 0 {
        return xdp_action::XDP_PASS;
    }
    if new_flow {
        let data = ctx.data();
        if data + L4_SPORT + 2 > ctx.data_end() {
            return xdp_action::XDP_PASS;
        }
        // SAFETY: plain helper call.
        let random = unsafe { bpf_get_prandom_u32() };
        // SAFETY: bounds checked above.
        unsafe {
            ((data + IPV4_SRC) as *mut u32).write_unaligned(random);
            ((data + L4_SPORT) as *mut u16).write_unaligned((random >> 16) as u16);
        }
    }
    xdp_action::XDP_TX
}
