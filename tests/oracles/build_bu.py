#!/usr/bin/env python3
"""Independent oracle: build an authenticated Binding Update with scapy.

Builds the UDP payload of a server's Binding Update (the IPv6 packet with its Mobility
Header) using scapy's Mobile IPv6 layers, computes the MH checksum with scapy and the AUTH
authenticator (HMAC-SHA256 truncated to 128 bits) with Python's hmac module, and prints the
payload as hex. Nothing here comes from the Rust implementation: the layout follows
RFC 6275 (MH, BU, Alternate Care-of Address), RFC 4283 (MN-ID), RFC 4285 (MESG-ID, AUTH),
RFC 6463 (Load Information, type 48) and RFC 5094 (Vendor-Specific, type 19), and the
project's conventions in anycast-common/src/wire.rs's module documentation:

* IPv4 addresses as IPv4-mapped IPv6 addresses (pass them so: ::ffff:a.b.c.d);
* authenticated data = IPv6 src | IPv6 dst | MH through the AUTH option's SPI, with the
  checksum field zero;
* the AUTH option last, with nothing after it, so at 8n+1 (RFC 4285 asks 4n+1; a 23-byte
  option ending a multiple-of-8 MH must start at 8n+1);
* vendor option: vendor id 0, sub-type 1, data = protocol (1) | port (2).

Usage: build_bu.py --home ADDR --agent ADDR --coa ADDR --mn-id ID --seq N --lifetime N
                   --spi N --secret-hex HEX [--mesg-id N] [--load P,S,MS,UC,MC]
                   [--service PROTO:PORT] [--no-ack]
"""

import argparse
import hashlib
import hmac
import struct
import sys

from scapy.compat import raw
from scapy.fields import ByteField, IntField, ShortField, StrFixedLenField
from scapy.layers.inet6 import (
    IPv6,
    MIP6MH_BU,
    MIP6OptAltCoA,
    MIP6OptMNID,
    MIP6OptMsgAuth,
    MIP6OptReplayProtection,
    _MIP6OptAlign,
)


class LoadInformation(_MIP6OptAlign):
    """RFC 6463 Load Information option (type 48, length 18); scapy has none."""

    name = "Load Information"
    fields_desc = [
        ByteField("otype", 48),
        ByteField("olen", 18),
        ShortField("priority", 0),
        IntField("sessions_in_use", 0),
        IntField("max_sessions", 0),
        IntField("used_capacity", 0),
        IntField("max_capacity", 0),
    ]
    # Natural alignment of the 32-bit fields (the project's choice).
    x = 4
    y = 0


class VendorSpecific(_MIP6OptAlign):
    """RFC 5094 Vendor-Specific Mobility Option (type 19); scapy has none."""

    name = "Vendor Specific"
    fields_desc = [
        ByteField("otype", 19),
        ByteField("olen", 8),
        IntField("vendor_id", 0),
        ByteField("subtype", 1),
        StrFixedLenField("data", b"\x00\x00\x00", 3),
    ]
    x = 4
    y = 2  # alignment requirement: 4n+2


class MsgAuthLast(MIP6OptMsgAuth):
    """AUTH that ends the MH: 8n+1 instead of scapy's (RFC 4285's) 4n+1."""

    x = 8
    y = 1


def build(args, authdata, cksum):
    flags = "A" * (not args.no_ack) + "H"
    options = [
        MIP6OptAltCoA(acoa=args.coa),
        MIP6OptMNID(subtype=1, id=args.mn_id.encode()),
    ]
    if args.mesg_id is not None:
        options.append(MIP6OptReplayProtection(timestamp=args.mesg_id))
    if args.load:
        p, s, ms, uc, mc = (int(v) for v in args.load.split(","))
        options.append(
            LoadInformation(
                priority=p,
                sessions_in_use=s,
                max_sessions=ms,
                used_capacity=uc,
                max_capacity=mc,
            )
        )
    if args.service:
        proto, port = (int(v) for v in args.service.split(":"))
        options.append(VendorSpecific(data=struct.pack("!BH", proto, port)))
    options.append(MsgAuthLast(subtype=1, mspi=args.spi, authdata=authdata))
    bu = MIP6MH_BU(
        seq=args.seq, flags=flags, mhtime=args.lifetime, res=0, options=options
    )
    if cksum is not None:
        bu.cksum = cksum
    return IPv6(src=args.home, dst=args.agent, hlim=255, tc=0, fl=0) / bu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--coa", required=True)
    ap.add_argument("--mn-id", required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--lifetime", type=int, required=True)
    ap.add_argument("--spi", type=int, required=True)
    ap.add_argument("--secret-hex", required=True)
    ap.add_argument("--mesg-id", type=int)
    ap.add_argument("--load")
    ap.add_argument("--service")
    ap.add_argument("--no-ack", action="store_true")
    args = ap.parse_args()
    secret = bytes.fromhex(args.secret_hex)

    # First pass: authenticator placeholder and checksum zero, to get the authenticated bytes.
    draft = raw(build(args, b"\x00" * 16, 0))
    mh = draft[40:]
    if len(mh) % 8 != 0 or mh[-23] != 9 or mh[-22] != 21:
        sys.exit(f"AUTH is not the last 23 bytes of the MH: {mh.hex()}")
    if mh[4:6] != b"\x00\x00":
        sys.exit("checksum field not zero in the draft")
    covered = draft[8:24] + draft[24:40] + mh[: len(mh) - 16]
    tag = hmac.new(secret, covered, hashlib.sha256).digest()[:16]

    # Second pass: the real authenticator; scapy computes the checksum (cksum=None).
    final = raw(build(args, tag, None))
    if final[:40] != draft[:40] or final[40:44] != mh[:4] or final[46:-16] != mh[6:-16]:
        sys.exit("the message changed between the passes")
    print(final.hex())


if __name__ == "__main__":
    main()
