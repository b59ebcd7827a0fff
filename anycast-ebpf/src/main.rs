//! The anycast data path: the agent's XDP forwarder (`agent/`), the server's decapsulator
//! (XDP) and SYN-ACK tunnel (TC egress) (`server/`), the client's tunnel for route
//! optimization (TC egress, `client/`), IP-in-IP from TC egress (`tc_tunnel.rs`, shared by
//! both TC programs), the header views they share (`packet.rs`), and the trivial programs (`trivial.rs`: a pass-through for veth peers, a
//! MAC-swapping baseline, and the benchmark's traffic generator and sink).
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
mod client;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod server;
#[cfg(target_arch = "bpf")]
mod tc_tunnel;

#[cfg(target_arch = "bpf")]
mod trivial;

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
