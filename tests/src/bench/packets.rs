//! The bench's frames (built with [`crate::packet`]) and sources of frames that give each
//! call a chosen flow: the same one, a fresh one (never seen before: a flow-table miss), or
//! one picked at random from a set installed earlier (hits spread over the table).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::report::Rng;
use crate::packet::{ethernet, inet_checksum, tcp, Ip, ETH_LEN};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
pub const AGENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

pub const PAYLOAD: &[u8] = b"anycast bench payload...";

/// An IPv4 TCP frame from the client to `dst:dport`.
pub fn v4_tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = tcp(sport, dport, flags, PAYLOAD);
    let ip = Ip::new(IpAddr::V4(src), IpAddr::V4(dst), 6).id(0x1c46);
    ethernet(AGENT_MAC, CLIENT_MAC, None, &ip.packet(&l4))
}

/// An IPv6 TCP frame from the client to `dst:dport`.
pub fn v6_tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = tcp(sport, dport, flags, PAYLOAD);
    let ip = Ip::new(IpAddr::V6(src), IpAddr::V6(dst), 6);
    ethernet(AGENT_MAC, CLIENT_MAC, None, &ip.packet(&l4))
}

/// Which flow each frame of a [`Source`] carries.
#[derive(Clone, Copy, Debug)]
pub enum Pick {
    /// Always the template's own flow.
    Same,
    /// Flow `next`, `next + 1`, ...: each one new.
    Fresh,
    /// A flow drawn at random from flows `0..n`.
    Random(u64),
}

/// Frames of one template whose flow (client address and port, and the destination among
/// `dsts`) is set by a flow number.
pub struct Source {
    buf: Vec<u8>,
    v6: bool,
    dsts: Vec<Vec<u8>>,
    pub pick: Pick,
    pub next: u64,
    rng: Rng,
}

const V4_SRC: usize = ETH_LEN + 12;
const V4_DST: usize = ETH_LEN + 16;
const V4_SPORT: usize = ETH_LEN + 20;
const V6_SRC: usize = ETH_LEN + 8;
const V6_DST: usize = ETH_LEN + 24;

impl Source {
    /// `template` is a frame from [`v4_tcp`] or [`v6_tcp`]; with `dsts` empty the template's
    /// destination is kept, otherwise flow `k` goes to `dsts[k % dsts.len()]`.
    pub fn new(template: Vec<u8>, dsts: Vec<Vec<u8>>, pick: Pick, seed: u64) -> Source {
        let v6 = template[12..14] == [0x86, 0xdd];
        Source {
            buf: template,
            v6,
            dsts,
            pick,
            next: 0,
            rng: Rng::new(seed),
        }
    }

    /// The frame of flow `k`.
    pub fn flow(&mut self, k: u64) -> &[u8] {
        if self.v6 {
            // Client 2001:db8:ffff::/64, the flow number in the low 64 bits.
            self.buf[V6_SRC + 8..V6_SRC + 16].copy_from_slice(&k.to_be_bytes());
            if !self.dsts.is_empty() {
                let d = &self.dsts[(k % self.dsts.len() as u64) as usize];
                self.buf[V6_DST..V6_DST + 16].copy_from_slice(d);
            }
        } else {
            // Client 198.18.0.0/15 and a port: 2^17 addresses x 60000 ports.
            let a = 0xc612_0000u32 | (k & 0x1_ffff) as u32;
            let port = 1024 + (k >> 17) as u16;
            self.buf[V4_SRC..V4_SRC + 4].copy_from_slice(&a.to_be_bytes());
            self.buf[V4_SPORT..V4_SPORT + 2].copy_from_slice(&port.to_be_bytes());
            if !self.dsts.is_empty() {
                let d = &self.dsts[(k % self.dsts.len() as u64) as usize];
                self.buf[V4_DST..V4_DST + 4].copy_from_slice(d);
            }
            // Keep the header checksum right (the data path does not check it).
            self.buf[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
            let c = inet_checksum(&self.buf[ETH_LEN..ETH_LEN + 20]);
            self.buf[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
        }
        &self.buf
    }

    /// The next frame, by the source's [`Pick`].
    pub fn frame(&mut self) -> &[u8] {
        match self.pick {
            Pick::Same => &self.buf,
            Pick::Fresh => {
                let k = self.next;
                self.next += 1;
                self.flow(k)
            }
            Pick::Random(n) => {
                let k = self.rng.below(n);
                self.flow(k)
            }
        }
    }
}

pub fn v4_bytes(a: Ipv4Addr) -> Vec<u8> {
    a.octets().to_vec()
}
