"""Tar archives crafted byte by byte: headers with any field, checksums right or wrong,
pax records and GNU long names of any length, for the tests of hostile tar headers."""

from __future__ import annotations

import tarfile

from data.tar_headers import BLOCK
from tests.helpers.samples import jpeg


def with_checksum(header: bytes) -> bytes:
    header = bytearray(header[:148] + b" " * 8 + header[156:])
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def member_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT)


def base256(value: int) -> bytes:
    """A 12-byte base-256 size field (GNU): 0x80 then the value, or 0xff then its two's complement."""
    return (b"\x80" + value.to_bytes(11, "big")) if value >= 0 else (b"\xff" + (256**11 + value).to_bytes(11, "big"))


def with_field(header: bytes, start: int, value: bytes, checksum: bool = True) -> bytes:
    header = header[:start] + value + header[start + len(value):]
    return with_checksum(header) if checksum else header


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return member_header(name, len(data), kind) + padded(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One "LENGTH KEY=VALUE\\n" record, its length counting its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def extended(kind: bytes, payload: bytes) -> bytes:
    """A pax (x, g) or GNU long name/link (L, K) header and its payload."""
    return member_header("././@Extended", len(payload), kind) + padded(payload)


def dotted_path(length: int) -> bytes:
    """The name that makes a backtracking split take quadratic time: dots, then a slash."""
    return b"." * (length - 1) + b"/"


def archive(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(2 * BLOCK)


def sample(key: str, number: int) -> bytes:
    return member(f"{key}.jpg", jpeg(number)) + member(f"{key}.txt", f"caption {key}".encode())


def pointing_back_at_itself() -> bytes:
    """A member whose base-256 size is -512: the next header is itself."""
    return with_field(member_header("loop.jpg", 0), 124, base256(-BLOCK))
