"""Xet storage of the local Hub: xorbs, file reconstructions and the binary formats of hub-docs' docs/xet/.

The Hub stores new uploads in Xet: a file is a list of terms (a xorb, a range of its chunks); the
client asks the CAS server for a file's reconstruction and fetches byte ranges of xorbs from signed
URLs. Here:

- files that arrived through git-LFS are given a Xet form on first use: cut into 64 KiB chunks,
  stored uncompressed in xorbs, under the real Xet file hash when ``hf_xet`` is installed (it
  computes it; the client checks nothing else on download);
- files uploaded through Xet arrive as xorbs (chunks, possibly LZ4 or byte-grouped LZ4) and a shard
  (file reconstructions with their sha256); the file is rebuilt from its terms, checked against
  its sha256 and kept as an LFS blob too, so every other endpoint serves it unchanged.

Layout under ``data/xet/``: ``xorbs/<hash>`` (as uploaded or made), ``xorbs/<hash>.json`` (chunk
byte offsets and lengths), ``files/<file hash>.json`` (size, sha256, terms), ``sha256/<sha256>``
(the file hash of an LFS object). Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import uuid
from pathlib import Path
from typing import Iterator

from .common import SHA256_RE, HubError

#: chunk size of the Xet form given to LFS files (the Hub's content-defined chunks average 64 KiB)
CHUNK_SIZE = 64 * 1024
#: uncompressed bytes per xorb made here (the protocol allows 64 MiB serialized)
XORB_BYTES = 16 * 1024 * 1024
MAX_XORB_BYTES = 64 * 1024 * 1024
CHUNK_HEADER = 8
SHARD_TAG_LEN = 32
_BOOKEND = b"\xff" * 32
FLAG_VERIFICATION = 1 << 31
FLAG_METADATA_EXT = 1 << 30


def hash_hex(raw: bytes) -> str:
    """A 32-byte Xet hash as the API writes it: four little-endian u64, each as 16 hex digits."""
    return "".join(f"{v:016x}" for v in struct.unpack("<4Q", raw))


# ---------------------------------------------------------------- chunks and compression

def chunk_header(data_len: int, scheme: int, raw_len: int) -> bytes:
    return bytes([0]) + data_len.to_bytes(3, "little") + bytes([scheme]) + raw_len.to_bytes(3, "little")


def iter_chunks(body: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(byte offset of the header, compressed length, scheme, uncompressed length) of each chunk."""
    pos = 0
    while pos < len(body):
        if pos + CHUNK_HEADER > len(body):
            raise HubError(400, "Xorb: truncated chunk header")
        version, scheme = body[pos], body[pos + 4]
        size = int.from_bytes(body[pos + 1:pos + 4], "little")
        raw = int.from_bytes(body[pos + 5:pos + 8], "little")
        if version != 0 or scheme > 2 or pos + CHUNK_HEADER + size > len(body):
            raise HubError(400, f"Xorb: invalid chunk header at byte {pos}")
        yield pos, size, scheme, raw
        pos += CHUNK_HEADER + size


def decode_chunk(data: bytes, scheme: int, raw_len: int) -> bytes:
    if scheme == 0:
        out = data
    elif scheme == 1:
        out = lz4_decompress(data, raw_len)
    else:
        out = _ungroup4(lz4_decompress(data, raw_len))
    if len(out) != raw_len:
        raise HubError(400, f"Xorb: a chunk decodes to {len(out)} bytes, its header says {raw_len}")
    return out


def _ungroup4(grouped: bytes) -> bytes:
    """Undo byte grouping by 4 (hub-docs docs/xet/xorb.md): groups 1-4 back to interleaved bytes."""
    n = len(grouped)
    sizes = [n // 4 + (1 if k < n % 4 else 0) for k in range(4)]
    out = bytearray(n)
    start = 0
    for k, size in enumerate(sizes):
        out[k::4] = grouped[start:start + size]
        start += size
    return bytes(out)


def lz4_decompress(src: bytes, raw_len: int) -> bytes:
    """LZ4 (frame or raw block) to bytes; pure Python, for the small chunks of a xorb (≤ 128 KiB)."""
    if src[:4] == b"\x04\x22\x4d\x18":
        return _lz4_frame(src)
    return bytes(_lz4_block(src, 0, len(src), bytearray()))


def _lz4_frame(src: bytes) -> bytes:
    flg = src[4]
    pos = 6 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0) + 1
    out = bytearray()
    while pos + 4 <= len(src):
        size = int.from_bytes(src[pos:pos + 4], "little")
        pos += 4
        if size == 0:
            break
        if size & 0x80000000:
            size &= 0x7FFFFFFF
            out += src[pos:pos + size]
        else:
            _lz4_block(src, pos, pos + size, out)
        pos += size + (4 if flg & 0x10 else 0)
    return bytes(out)


def _lz4_extend(src: bytes, i: int, n: int) -> tuple[int, int]:
    """An LZ4 length past 15: bytes at `i` added on while they are 255; (the length, the next index)."""
    while True:
        b = src[i]
        i += 1
        n += b
        if b != 255:
            return n, i


def _lz4_block(src: bytes, i: int, end: int, out: bytearray) -> bytearray:
    while i < end:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            lit, i = _lz4_extend(src, i, lit)
        out += src[i:i + lit]
        i += lit
        if i >= end:
            break
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        length = token & 15
        if length == 15:
            length, i = _lz4_extend(src, i, length)
        length += 4
        start = len(out) - offset
        if offset <= 0 or start < 0:
            raise HubError(400, "Xorb: invalid LZ4 data")
        if offset >= length:
            out += out[start:start + length]
        else:
            for k in range(length):
                out.append(out[start + k])
    return out


def xorb_chunks(body: bytes) -> list[tuple[int, int, int, int]]:
    """The chunks of a serialized xorb (its footer, when present, is left out)."""
    if len(body) > MAX_XORB_BYTES:
        raise HubError(400, "Xorb larger than 64 MiB")
    for end in _chunk_region_ends(body):
        try:
            chunks = list(iter_chunks(body[:end]))
        except HubError:
            continue
        if chunks:
            return chunks
    raise HubError(400, "Xorb is not in the Xet xorb format")


def _chunk_region_ends(body: bytes) -> list[int]:
    ends = []
    if len(body) >= 4:
        info_len = int.from_bytes(body[-4:], "little")
        if 0 < info_len <= len(body) - 4:
            ends.append(len(body) - 4 - info_len)  # chunks, then the XorbObjectInfo footer and its length
    ends.append(len(body))  # xorbs written before the footer existed
    return ends


# ---------------------------------------------------------------- shards

def parse_shard_files(body: bytes) -> list[dict]:
    """The file reconstructions of an uploaded shard: [{hash, terms: [(xorb, start, end, bytes)], sha256}]."""
    if len(body) < 48 + 48:
        raise HubError(400, "Shard too short")
    version = int.from_bytes(body[32:40], "little")
    if version != 2:
        raise HubError(400, f"Shard header version {version}, expected 2")
    pos, files = 48, []
    while True:
        if pos + 48 > len(body):
            raise HubError(400, "Shard: file info section has no bookend")
        head = body[pos:pos + 48]
        pos += 48
        if head[:32] == _BOOKEND:
            return files
        flags, n = struct.unpack("<II", head[32:40])
        if pos + 48 * n > len(body):
            raise HubError(400, "Shard: truncated file info")
        terms = []
        for k in range(n):
            e = body[pos + 48 * k:pos + 48 * (k + 1)]
            _, unpacked, start, end = struct.unpack("<IIII", e[32:48])
            if end <= start:
                raise HubError(400, "Shard: empty chunk range in a term")
            terms.append((hash_hex(e[:32]), start, end, unpacked))
        pos += 48 * n
        if flags & FLAG_VERIFICATION:
            pos += 48 * n
        sha256 = None
        if flags & FLAG_METADATA_EXT:
            sha256 = hash_hex(body[pos:pos + 32])  # written like every Xet hash (4 little-endian u64)
            pos += 48
        files.append({"hash": hash_hex(head[:32]), "terms": terms, "sha256": sha256})


# ---------------------------------------------------------------- the store

class XetStore:
    """Xorbs and file reconstructions on disk (see the module docstring for the layout)."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        for sub in ("xorbs", "files", "sha256", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.write_bytes(data)
        os.replace(tmp, path)

    # ---- xorbs
    def xorb_path(self, xorb: str) -> Path:
        return self.root / "xorbs" / xorb

    def has_xorb(self, xorb: str) -> bool:
        return (self.root / "xorbs" / f"{xorb}.json").is_file()

    def put_xorb(self, xorb: str, body: bytes) -> bool:
        """Store an uploaded xorb (its chunks must parse); False when it was stored already."""
        if not SHA256_RE.match(xorb):
            raise HubError(400, "Invalid xorb hash")
        chunks = xorb_chunks(body)
        with self.lock:
            if self.has_xorb(xorb):
                return False
            self._write(self.xorb_path(xorb), body)
            index = {"offsets": [c[0] for c in chunks] + [chunks[-1][0] + CHUNK_HEADER + chunks[-1][1]],
                     "lengths": [c[3] for c in chunks], "schemes": [c[2] for c in chunks]}
            self._write(self.root / "xorbs" / f"{xorb}.json", json.dumps(index).encode())
            return True

    def xorb_index(self, xorb: str) -> dict:
        try:
            return json.loads((self.root / "xorbs" / f"{xorb}.json").read_text())
        except FileNotFoundError:
            raise HubError(400, f"Unknown xorb {xorb}") from None

    def read_terms(self, terms: list) -> Iterator[bytes]:
        """The bytes of a file, term by term (chunks decoded)."""
        for xorb, start, end, _ in terms:
            index = self.xorb_index(xorb)
            if end > len(index["lengths"]):
                raise HubError(400, f"A term asks for chunks {start}-{end} of xorb {xorb}, which has "
                                    f"{len(index['lengths'])}")
            with open(self.xorb_path(xorb), "rb") as f:
                f.seek(index["offsets"][start])
                region = f.read(index["offsets"][end] - index["offsets"][start])
            pos = 0
            for k in range(start, end):
                size = int.from_bytes(region[pos + 1:pos + 4], "little")
                yield decode_chunk(region[pos + CHUNK_HEADER:pos + CHUNK_HEADER + size], region[pos + 4],
                                   index["lengths"][k])
                pos += CHUNK_HEADER + size

    # ---- files
    def file_record(self, file_hash: str) -> dict | None:
        try:
            return json.loads((self.root / "files" / f"{file_hash}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def put_file(self, file_hash: str, sha256: str, size: int, terms: list) -> None:
        with self.lock:
            self._write(self.root / "files" / f"{file_hash}.json",
                        json.dumps({"size": size, "sha256": sha256, "terms": terms}).encode())
            self._write(self.root / "sha256" / sha256, file_hash.encode())

    def hash_of(self, sha256: str) -> str | None:
        """The Xet file hash of an LFS object that has a Xet form."""
        try:
            return (self.root / "sha256" / sha256).read_text().strip()
        except FileNotFoundError:
            return None

    def ensure(self, sha256: str, blob: Path) -> str:
        """The Xet file hash of an LFS blob, giving it a Xet form (chunks in xorbs) on first use."""
        known = self.hash_of(sha256)
        if known is not None and self.file_record(known) is not None:
            return known
        with self.lock:
            known = self.hash_of(sha256)
            if known is not None and self.file_record(known) is not None:
                return known
            file_hash = _xet_file_hash(blob, sha256)
            terms, size = [], 0
            with open(blob, "rb") as f:
                while True:
                    data = f.read(XORB_BYTES)
                    if not data:
                        break
                    pieces = [data[k:k + CHUNK_SIZE] for k in range(0, len(data), CHUNK_SIZE)]
                    body = b"".join(chunk_header(len(p), 0, len(p)) + p for p in pieces)
                    xorb = hashlib.sha256(b"local-hub xorb\0" + body).hexdigest()
                    self.put_xorb(xorb, body)
                    terms.append([xorb, 0, len(pieces), len(data)])
                    size += len(data)
            self.put_file(file_hash, sha256, size, terms)
            return file_hash

    def reconstruction(self, file_hash: str, first: int, last: int | None) -> tuple[dict, list]:
        """(record, [(xorb, chunk start, chunk end, unpacked bytes, byte start, byte end incl.)], offset)
        for the bytes first..last (inclusive; None: to the end) of a file."""
        rec = self.file_record(file_hash)
        if rec is None:
            raise HubError(404, "File not found")
        size = rec["size"]
        if first >= size and size:
            raise HubError(416, "Requested range not satisfiable")
        last = size - 1 if last is None else min(last, size - 1)
        out, pos, offset = [], 0, None
        for xorb, start, end, _ in rec["terms"]:
            index = self.xorb_index(xorb)
            for k in range(start, end):
                n = index["lengths"][k]
                if pos + n > first and pos <= last:
                    if offset is None:
                        offset = first - pos
                    if out and out[-1][0] == xorb and out[-1][2] == k:
                        out[-1][2] = k + 1
                        out[-1][3] += n
                        out[-1][5] = index["offsets"][k + 1] - 1
                    else:
                        out.append([xorb, k, k + 1, n, index["offsets"][k], index["offsets"][k + 1] - 1])
                pos += n
        return rec, [tuple(t) for t in out], offset or 0


def _xet_file_hash(blob: Path, sha256: str) -> str:
    """The file's Xet hash as the Hub computes it (hf_xet's own), or a stand-in when hf_xet is missing."""
    try:
        import hf_xet  # type: ignore[import-not-found]

        return str(hf_xet.hash_files([str(blob)])[0].hash)
    except Exception:  # noqa: BLE001 - hf_xet absent or failing: the client checks no file hash on download
        return hashlib.sha256(b"local-hub file\0" + bytes.fromhex(sha256)).hexdigest()
