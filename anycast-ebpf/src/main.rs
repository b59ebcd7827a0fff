//! The anycast data path: the agent's XDP forwarder (`agent/`), the server's decapsulator
//! (XDP) and SYN-ACK tunnel (TC egress) (`server/`), the header views they share
//! (`packet.rs`), and two trivial programs (a pass-through for veth peers, a MAC-swapping
//! baseline for benchmarks).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

/// Checks at compile time that a `#[map]` static is named as userspace looks it up: the
/// static's identifier (the map's name in the object) must equal the name defined once in
/// `anycast_common::maps`.
#[cfg(target_arch = "bpf")]
macro_rules! map_name {
    ($map:ident, $name:expr) => {
        const _: () = assert!(
            $crate::same_str(stringify!($map), $name),
            concat!(
                "map ",
                stringify!($map),
                " is not named as in anycast_common::maps"
            )
        );
    };
}

#[cfg(target_arch = "bpf")]
const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(target_arch = "bpf")]
mod agent;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod server;

#[cfg(target_arch = "bpf")]
mod trivial {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

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
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
