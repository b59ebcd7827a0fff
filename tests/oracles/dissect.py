#!/usr/bin/env python3
"""Independent oracle: dissect binding messages with scapy and check them.

Reads UDP payloads (hex, one per argument), dissects each with scapy's IPv6 and Mobile IPv6
layers, recomputes the Mobility Header checksum with scapy (RFC 6275 6.1.1 pseudo-header)
and, given --secret-hex, the AUTH authenticator with Python's hmac module (HMAC-SHA256/128
over IPv6 src | IPv6 dst | MH through the AUTH SPI with the checksum zero; see
anycast-common/src/wire.rs). Prints one JSON object per payload, one per line. Nothing here
comes from the Rust implementation.

Usage: dissect.py [--secret-hex HEX] HEX...
"""

import argparse
import hashlib
import hmac
import json
import socket
import struct

from scapy.compat import raw
from scapy.layers.inet6 import IPv6, in6_chksum

MH_FIXED = {0: 8, 5: 12, 6: 12, 7: 24}


def walk_options(mh, start):
    """(offset, type, data) of each option, Pad1 included, from the raw MH bytes."""
    out, i = [], start
    while i < len(mh):
        if mh[i] == 0:
            out.append((i, 0, b""))
            i += 1
            continue
        n = mh[i + 1]
        out.append((i, mh[i], mh[i + 2 : i + 2 + n]))
        i += 2 + n
    if i != len(mh):
        raise SystemExit(f"options overrun the MH: {mh.hex()}")
    return out


def dissect(payload, secret):
    pkt = IPv6(payload)
    mh_layer = pkt.payload
    mh = raw(mh_layer)
    zeroed = mh[:4] + b"\x00\x00" + mh[6:]
    out = {
        "version": pkt.version,
        "tc": pkt.tc,
        "fl": pkt.fl,
        "plen": pkt.plen,
        "nh": pkt.nh,
        "hlim": pkt.hlim,
        "src": pkt.src,
        "dst": pkt.dst,
        "layer": mh_layer.name,
        "mh_proto": mh[0],
        "mh_len_bytes": len(mh),
        "hlen": mh[1],
        "mh_type": mh[2],
        "cksum": mh_layer.cksum,
        "cksum_computed": in6_chksum(135, pkt, zeroed),
    }
    t = mh[2]
    if t == 5:
        out.update(seq=mh_layer.seq, flags=str(mh_layer.flags), lifetime=mh_layer.mhtime)
    elif t == 6:
        out.update(status=mh_layer.status, flags=str(mh_layer.flags), seq=mh_layer.seq,
                   lifetime=mh_layer.mhtime)
    elif t == 7:
        out.update(status=mh_layer.status, home=mh_layer.ha)
    options = []
    for off, typ, data in walk_options(mh, MH_FIXED[t]):
        o = {"offset": off, "type": typ, "len": len(data)}
        if typ == 3:
            o["alt_coa"] = socket.inet_ntop(socket.AF_INET6, data)
        elif typ == 8:
            o["subtype"], o["id"] = data[0], data[1:].decode()
        elif typ == 10:
            o["timestamp"] = struct.unpack("!Q", data)[0]
        elif typ == 48:
            o["load"] = list(struct.unpack("!HIIII", data))
        elif typ == 19:
            vid, sub = struct.unpack("!IB", data[:5])
            o["vendor_id"], o["subtype"] = vid, sub
            if len(data) == 8:
                o["protocol"], o["port"] = struct.unpack("!BH", data[5:])
        elif typ == 9:
            o["subtype"] = data[0]
            o["spi"] = struct.unpack("!I", data[1:5])[0]
            o["authenticator"] = data[5:].hex()
            if secret is not None:
                covered = payload[8:40] + zeroed[: off + 7]
                tag = hmac.new(secret, covered, hashlib.sha256).digest()[:16]
                o["auth_ok"] = hmac.compare_digest(tag, data[5:])
        options.append(o)
    out["options"] = options
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secret-hex")
    ap.add_argument("payloads", nargs="+")
    args = ap.parse_args()
    secret = bytes.fromhex(args.secret_hex) if args.secret_hex is not None else None
    for h in args.payloads:
        print(json.dumps(dissect(bytes.fromhex(h), secret)))


if __name__ == "__main__":
    main()
