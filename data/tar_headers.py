"""The header chain of a tar shard, walked by our own parser: the one every shard loop uses.

Shards come from outside, and the interpreter's tarfile trusts their headers: a
member whose base-256 size is negative points back at itself and tarfile walks
that loop forever while its memory grows; a pax record with a 5000-digit length
or a non-numeric ``GNU.sparse.map`` raises ValueError from deep inside it; its
pax parsing takes time quadratic in the header's size, and pax and GNU long
names are read whole into memory, whatever their size.

So the index scan, the random-access reader and the sequential one (iter_samples) all read
headers here: 512-byte blocks, the checksum, octal or base-256 sizes, the type
flag, ustar prefixes, pax records (``path`` and ``size``) and GNU long names.
What cannot be part of a well-formed archive raises ``UnreadableTar``: a negative
size, a header that is not after the previous one, data past the end of the
file, a malformed pax record, a sparse member, and an extended header (pax, GNU
long name or long link) over ``MAX_EXTENDED_HEADER`` bytes, refused from its
size before a byte of it is read. Every header moves the walk forward by at
least one block and every read is bounded, so a shard costs time linear in its
size and bounded memory, whatever it holds.

Members are grouped as tarfile reports them (links, devices and folders carry
no data; an unknown type's data is skipped), so offsets found here are the
offsets tarfile-based tools find.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
MAX_EXTENDED_HEADER = 64 * 2**10  # bytes of one pax header or GNU long name; real ones are far smaller
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = frozenset({b"0", b"\0", b"7"})  # file, old-style file, contiguous file
_HEADER_ONLY = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})  # links, devices, folder, FIFO: no data
_PAX, _PAX_GLOBAL, _LONG_NAME, _LONG_LINK, _SPARSE = b"x", b"g", b"L", b"K", b"S"
_EXTENDED = frozenset({_PAX, _PAX_GLOBAL, _LONG_NAME, _LONG_LINK})
_GNU_TYPES = frozenset({_LONG_NAME, _LONG_LINK, _SPARSE})  # their ustar prefix field holds other things
_MAX_LENGTH_DIGITS = len(str(MAX_EXTENDED_HEADER))
_HIGH_BYTES = bytes(range(128, 256))  # negative when a header's bytes are summed as signed


class UnreadableTar(Exception):
    """The shard cannot be read from here on. ``reason`` says why without saying where
    (a reader must not reveal which sample it was sent to); ``str()`` adds the offset."""

    def __init__(self, reason: str, offset: int):
        super().__init__(f"{reason} (header at byte {offset})")
        self.reason = reason
        self.offset = offset


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # of its first header, extended headers included: where a reader seeks to
    data_offset: int
    size: int
    regular: bool  # a file with data (not a link, folder or device)


def walk(stream: BinaryIO, start: int = 0) -> Iterator[TarMember]:
    """The members of the tar ``stream`` reads, from the header at byte ``start`` to the end
    of the archive. Raises UnreadableTar where the chain breaks; what was yielded before
    stands. The consumer may move the stream's position between members."""
    end_of_file = stream.seek(0, os.SEEK_END)
    if start < 0 or start % BLOCK:
        raise UnreadableTar("a header offset off the 512-byte grid", start)
    position, first, pending, global_pax = start, None, {}, {}
    while True:
        stream.seek(position)
        block = stream.read(BLOCK)
        if not block or block == _ZERO_BLOCK:  # the end, marked or not (as tarfile reads it)
            return
        if len(block) < BLOCK:
            raise UnreadableTar("truncated header", position)
        _check_checksum(block, position)
        kind, size = block[156:157], _size(block, position)
        if kind in _EXTENDED and size > MAX_EXTENDED_HEADER:
            raise UnreadableTar(f"an extended header of {size} bytes (at most {MAX_EXTENDED_HEADER})", position)
        data_offset = position + BLOCK
        first = position if first is None else first
        if kind in _EXTENDED:
            data_end = _data_end(data_offset, size, end_of_file, position)
            if kind != _LONG_LINK:  # a link target is never used: not even read
                stream.seek(data_offset)
                _extend(kind, stream.read(size), pending, global_pax, position)
        else:
            fields = global_pax | pending
            if kind == _SPARSE or any(key.startswith("GNU.sparse.") for key in fields):
                raise UnreadableTar("a sparse member (shards hold plain files)", position)
            name = fields.get("path", _name(block, kind))
            size = fields.get("size", size)
            data_end = _data_end(data_offset, 0 if kind in _HEADER_ONLY else size, end_of_file, position)
            regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))
            yield TarMember(name, first, data_offset, size, regular)
            first, pending = None, {}
        following = data_end + -(data_end - data_offset) % BLOCK
        if following <= position:
            raise UnreadableTar("a header that is not after the previous one", position)
        position = following


def _data_end(data_offset: int, size: int, end_of_file: int, position: int) -> int:
    if data_offset + size > end_of_file:
        raise UnreadableTar("data past the end of the file (truncated?)", position)
    return data_offset + size


def reason_of(exn: Exception) -> str:
    """Why reading a shard failed, without where in it (see `UnreadableTar.reason`)."""
    return exn.reason if isinstance(exn, UnreadableTar) else f"{type(exn).__name__}: {exn}"


def read_data(stream: BinaryIO, member: TarMember) -> bytes:
    """A member's bytes (its size already checked against the file by `walk`)."""
    stream.seek(member.data_offset)
    data = stream.read(member.size)
    if len(data) != member.size:
        raise UnreadableTar("member data cut short", member.offset)
    return data


def _check_checksum(block: bytes, position: int) -> None:
    """The stored checksum must be the sum of the header's bytes with its own field as
    spaces, unsigned or (old tars) signed."""
    stored = _octal(block[148:156])
    rest = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(rest)
    if stored != unsigned and stored != unsigned - 256 * (BLOCK - len(rest.translate(None, _HIGH_BYTES))):
        raise UnreadableTar("bad header checksum (not a tar, or damaged)", position)


def _size(block: bytes, position: int) -> int:
    field = block[124:136]
    if field[0] == 0x80:  # base-256, positive (GNU, for sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        raise UnreadableTar("a negative member size", position)
    size = _octal(field)
    if size is None:
        raise UnreadableTar("a size field that is not a number", position)
    return size


def _octal(field: bytes) -> int | None:
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if digits.strip(b"01234567"):
        return None
    return int(digits, 8)


def _name(block: bytes, kind: bytes) -> str:
    name = _text(block[:100])
    prefix = _text(block[345:500]) if kind not in _GNU_TYPES else ""
    return f"{prefix}/{name}" if prefix else name


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _extend(kind: bytes, payload: bytes, pending: dict, global_pax: dict, position: int) -> None:
    """What an extended header says of the next member (or, global, of all later ones)."""
    if kind == _LONG_NAME:
        pending["path"] = _text(payload)
        return
    for key, value in _pax_records(payload, position):
        if key == "size":
            if not value.isdigit() or len(value) > 19:  # bytes.isdigit: ASCII digits only; < 2**63
                raise UnreadableTar("a pax size that is not a number", position)
            value = int(value)
        elif key == "path":
            value = value.decode("utf-8", "surrogateescape")
        elif not key.startswith("GNU.sparse."):
            continue
        (global_pax if kind == _PAX_GLOBAL else pending)[key] = value


def _pax_records(payload: bytes, position: int) -> Iterator[tuple[str, bytes]]:
    """The "LENGTH KEY=VALUE\\n" records of a pax header, in one pass: a length is at most as
    many digits as the header's size has, and must land on the record's newline."""
    at = 0
    while at < len(payload) and payload[at] != 0:
        space = payload.find(b" ", at, at + _MAX_LENGTH_DIGITS + 1)
        if space <= at or not payload[at:space].isdigit():
            raise UnreadableTar("a malformed pax record length", position)
        end = at + int(payload[at:space])
        if end <= space + 2 or end > len(payload) or payload[end - 1] != 0x0A:
            raise UnreadableTar("a malformed pax record", position)
        key, equals, value = payload[space + 1:end - 1].partition(b"=")
        if not equals or not key:
            raise UnreadableTar("a malformed pax record", position)
        yield key.decode("utf-8", "surrogateescape"), value
        at = end
