#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets (small, hand-made, readable here).

Frames are spelled out in bincode 2's standard encoding (varint integers: below 251 one byte,
251 + u16, 252 + u32, 253 + u64; strings and byte vectors as varint length then bytes; enums
as a varint variant index), in the order of `Frame`'s variants in src/messages/wire.rs.
`tunnel::codec::tests::committed_frame_seeds_decode` checks that every `frame-*` seed still
decodes, so this file cannot drift from the real format unnoticed.
Run from anywhere: python3 fuzz/seeds/make_seeds.py
"""
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def varint(n):
    if n < 251:
        return bytes([n])
    if n < 1 << 16:
        return bytes([251]) + struct.pack("<H", n)
    if n < 1 << 32:
        return bytes([252]) + struct.pack("<I", n)
    return bytes([253]) + struct.pack("<Q", n)


def string(s):
    b = s.encode() if isinstance(s, str) else s
    return varint(len(b)) + b


def seq(items):
    return varint(len(items)) + b"".join(items)


def headers(pairs):
    return seq([string(n) + string(v) for n, v in pairs])


def request(id, method, path, body=b"", scheme=0, skip=False):
    return (varint(3) + varint(id) + string("crm") + varint(scheme)
            + string("scim.example:8080") + string(method) + string(path)
            + headers([("Accept", "application/scim+json"), ("Authorization", "Bearer t")])
            + string(body) + bytes([1 if skip else 0]) + varint(5000))


FRAMES = {
    "hello": varint(0) + varint(2) + string("vm-1") + varint(0x1234_5678_9ABC)
    + seq([string("crm"), string("wiki")]),
    "welcome": varint(1) + varint(2) + varint(7),
    "targets": varint(2) + seq([string("crm")]),
    "request-get": request(1, "GET", "/scim/v2/Users?startIndex=1&count=100"),
    "request-post": request(2, "POST", "/scim/v2/Users", b'{"userName":"a@example.com"}', 1, True),
    "response-ok": varint(4) + varint(1) + varint(0) + varint(201)
    + headers([("etag", 'W/"1"'), ("content-type", "application/scim+json")]) + string(b"{}"),
    "response-undeclared": varint(4) + varint(2) + varint(1) + varint(0) + string("nope"),
    "response-timeout": varint(4) + varint(3) + varint(1) + varint(6) + string("10.0.0.1:443")
    + varint(5000),
    "cancel": varint(5) + varint(7),
    "ping": varint(6) + varint(1) + varint(123456789),
    "pong": varint(7) + varint(1) + varint(123456789),
    "goodbye": varint(8) + string("agent stopping"),
}


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    for target in ["frame_decoder", "handshake", "config_ini", "scim_response"]:
        shutil.rmtree(os.path.join(HERE, target), ignore_errors=True)

    for name, frame in FRAMES.items():
        write("frame_decoder", "frame-" + name, frame)
    # Record sequences: selector (limit 16 + 64 * s), then [len][flag ++ chunk] records.
    welcome = FRAMES["welcome"]
    write("frame_decoder", "records-one", bytes([4, len(welcome) + 1, 1]) + welcome)
    req = FRAMES["request-get"]
    half = len(req) // 2
    write("frame_decoder", "records-split",
          bytes([8, half + 1, 0]) + req[:half] + bytes([len(req) - half + 1, 1]) + req[half:])
    write("frame_decoder", "records-bad-flag", bytes([4, 2, 2, 5]))

    write("handshake", "message-shaped", bytes(range(48)))
    write("handshake", "xor-nothing", bytes([0]))
    write("handshake", "cut-to-key", bytes([1, 32]))
    write("handshake", "extend", bytes([2, 0xAA]))

    with open(os.path.join(ROOT, "config", "config.ini"), "rb") as f:
        write("config_ini", "sample", f.read())
    write("config_ini", "minimal",
          b"service_id = 0123456789abcdef0123\nhub = wss://hub.example.com/v1/connect\n")
    write("config_ini", "full",
          b"service_id = env:CONNECT_SERVICE_ID\nstate_dir = \"/var/lib/connect\"\n"
          b"hub = wss://[::1]:8443/v1/connect\nhub_ca = ca.pem\n"
          b"proxy = https://user:p%40ss@proxy.example.com:3128\nagent_name = vm-01\n\n"
          b"[target.crm]\naddr = 10.0.0.12:443 ; primary\nalways_tls = yes\n"
          b"insecure_allow_skip_tls_check = 1\n\n[target.wiki.lan]\naddr = [fd00::5]:8080\n"
          b"no_tls = true\n")
    write("config_ini", "errors",
          b"service_id_file = id\nservice_id = x\nhub = ws://hub\n[target.]\naddr = a:b\n"
          b"[target.x]\nadr = 1.2.3.4:5\n")

    page = (b'{"schemas":["urn:ietf:params:scim:api:messages:2.0:ListResponse"],'
            b'"totalResults":2,"startIndex":1,"itemsPerPage":2,"Resources":['
            b'{"id":"u1","externalId":"e1","userName":"a@example.com","active":"True",'
            b'"name":{"givenName":"A"},"emails":[{"value":"a@example.com","primary":true}]},'
            b'{"id":"u2","userName":"b@example.com","emails":null}]}')
    user = b'{"id":"u3","userName":"fuzz@example.com","externalId":"ext-1","active":false}'
    error = (b'{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":409,'
             b'"scimType":"uniqueness","detail":"userName taken"}')
    groups = (b'{"schemas":["urn:ietf:params:scim:api:messages:2.0:ListResponse"],'
              b'"totalResults":1,"startIndex":1,"itemsPerPage":1,"Resources":[{"id":"g1",'
              b'"externalId":"g-1","displayName":"Fuzzers","members":[{"value":"u3",'
              b'"type":"User"}]}]}')
    for name, body in [("list", page), ("user", user), ("error", error), ("groups", groups)]:
        write("scim_response", "body-" + name, body)

    def answer(status, body):
        return struct.pack("<HH", status, len(body)) + body

    write("scim_response", "session",
          answer(200, page) + answer(200, b'{"totalResults":0}') + answer(200, page)
          + answer(409, error) + answer(201, user) + answer(204, b"") + answer(404, b"not found")
          + answer(200, b'{"schemas":[]}'))
    write("scim_response", "retry-after", answer(429, b"slow down") + answer(503, b""))


if __name__ == "__main__":
    main()
