"""Safetensors headers and a streaming shard writer.

Reads go through `safetensors.safe_open` (lazy, per tensor). Two things the library lacks are
written here:

* `read_header` parses the 8-byte length + JSON header of a local file without mapping it, so
  local and remote inputs (`huggingface_hub.get_safetensors_metadata`) give the same
  `TensorMeta`, and a corrupt file gets a message that names it.
* `ShardWriter` writes a shard whose tensors arrive one by one. `safetensors.torch.save_file`
  needs every tensor of a shard in memory at once (a 5 GB buffer per shard); since the plan knows
  every output name, shape and dtype in advance, we write the header first and then each tensor's
  bytes at its offset as soon as it is merged.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import InputError, OutputError

# safetensors dtype codes <-> torch dtypes (the format's own names).
ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
FLOATING = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
# Test-only: seconds to sleep after each finished shard, so a test can kill a merge mid-write.
SLOW_WRITE_ENV = "HF_METAGPT_TEST_SLOW_WRITE"
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@dataclass(frozen=True)
class TensorMeta:
    """Where one stored tensor lives and what it is, from a safetensors header."""

    name: str
    file: str  # file name relative to the model folder / repo root
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def is_floating(self) -> bool:
        return self.dtype in FLOATING

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_TO_TORCH[self.dtype]


def dtype_itemsize(code: str) -> int:
    return torch.empty((), dtype=ST_TO_TORCH[code]).element_size()


def parse_header_json(raw: bytes, file: str, file_size: int | None = None, data_start: int = 0) -> dict[str, TensorMeta]:
    """Validate a header's JSON and turn it into `TensorMeta`s (shared by local and remote reads)."""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ is not a mapping of strings")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(
            f"Corrupt safetensors header in {file}: {exc}.",
            hint="Re-download or re-save the file; it is not a valid safetensors file.",
        ) from None
    out: dict[str, TensorMeta] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(info, dict):
                raise ValueError("entry is not a JSON object")
            dtype = info["dtype"]
            shape = tuple(_json_int(s) for s in info["shape"])
            begin, end = (_json_int(x) for x in info["data_offsets"])
            if not isinstance(dtype, str) or dtype not in ST_TO_TORCH:
                raise ValueError(f"unsupported dtype {dtype!r}")
            numel = 1
            for s in shape:
                if s < 0:
                    raise ValueError("negative dimension")
                numel *= s
            if end - begin != numel * dtype_itemsize(dtype) or begin < 0:
                raise ValueError("data offsets do not match shape and dtype")
            if file_size is not None and data_start + end > file_size:
                raise ValueError(f"data runs past the end of the file ({file_size} bytes), so it is truncated")
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"Corrupt safetensors header in {file}, tensor {name!r}: {exc}.",
                hint="Re-download or re-save the file; it is truncated or damaged.",
            ) from None
        out[name] = TensorMeta(name, file, dtype, shape, (begin, end))
    # The format stores tensors back to back from offset 0; safe_open refuses holes and overlaps
    # later, with a less helpful error, so they are refused here.
    pos = 0
    for m in sorted(out.values(), key=lambda m: m.data_offsets):
        if m.data_offsets[0] != pos:
            raise InputError(
                f"Corrupt safetensors header in {file}, tensor {m.name!r}: data offsets leave a gap or overlap.",
                hint="Re-download or re-save the file; it is damaged.")
        pos = m.data_offsets[1]
    return out


def _json_int(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{x!r} is not an integer")
    return x


def read_header(path: Path, rel_name: str | None = None) -> dict[str, TensorMeta]:
    """Tensor metadata of a local safetensors file, without reading its data."""
    rel = rel_name or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{rel} is too short to be a safetensors file ({size} bytes).",
                                 hint="Re-download the file; it is truncated.")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise InputError(f"Corrupt safetensors header in {rel}: header length {n} exceeds the file.",
                                 hint="Re-download the file; it is truncated or not safetensors.")
            raw = f.read(n)
    except OSError as exc:
        raise InputError(f"Cannot read {rel}: {exc.strerror}.") from None
    metas = parse_header_json(raw, rel, file_size=size, data_start=8 + n)
    end = 8 + n + max((m.data_offsets[1] for m in metas.values()), default=0)
    if end != size:
        raise InputError(f"Corrupt safetensors file {rel}: {size - end} byte(s) after its last tensor.",
                         hint="Re-download or re-save the file; it is damaged.")
    return metas


def build_header(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included, padded to 8) for tensors laid out in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        numel = 1
        for s in shape:
            numel *= s
        end = pos + numel * dtype_itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, end]}
        offsets[name] = (pos, end)
        pos = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, offsets


@contextmanager
def disk_full_is_clear(path: Path) -> Iterator[None]:
    """Turn 'no space left' (or a file size limit) while writing `path` into one clear OutputError."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        name = path.name.removesuffix(".tmp")
        raise OutputError(
            f"Disk full / no space while writing {name} in {path.parent} ({exc.strerror}).",
            hint="Free space or choose another --output; rerunning the same command resumes from the finished shards.",
        ) from None


#: Bytes written between two requests to start writing a shard back to disk (see ShardWriter).
WRITEBACK_STEP = 64 << 20


class ShardWriter:
    """Writes one safetensors shard; its tensors may arrive in any order, each one whole or in row slabs.

    The header (and so every tensor's place) is known from the plan, so each tensor is written at
    its own offset (`os.pwrite`): no shard buffer, and the engine may merge a shard's groups in any
    order (pass 2 of a two-pass merge runs backwards, see `stream`). Row slabs of one tensor come
    in row order. The shard is `done` once every tensor has all its bytes.

    The kernel keeps written pages dirty until a background threshold (a tenth of RAM) or the
    fsync at `close`, so a 1 GB shard would reach the disk only when it is finished, with the
    merge waiting on that fsync. Every `WRITEBACK_STEP` bytes the writer asks the kernel to start
    writing them back now (`posix_fadvise(DONTNEED)` starts write-back of dirty pages and drops the
    clean ones: nobody reads the output back during the merge), so the disk writes while the
    merge goes on and the final fsync has little left to do.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]) -> None:
        self.path = path
        self.header, self.offsets = build_header(entries, {"format": "pt"})
        self.size = len(self.header) + (max((o[1] for o in self.offsets.values()), default=0))
        self._left = {name: end - begin for name, (begin, end) in self.offsets.items()}
        self._pending = set(self._left)  # tensors not complete yet (empty ones too, until written)
        self._unsynced: list[tuple[int, int]] = []  # (offset, length) written since the last write-back
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with disk_full_is_clear(self.path):
                _pwrite_all(self._fd, memoryview(self.header), 0)
        except BaseException:
            self.abort()  # not handed to anyone yet: nobody else would remove it
            raise

    def write(self, name: str, tensor: torch.Tensor, *, part: bool = False) -> None:
        """Write a tensor at its place; with `part`, its next rows (it is done once all its bytes came)."""
        if name not in self._pending:
            raise RuntimeError(f"shard {self.path.name}: got {name}, which it "
                               + ("already has" if name in self._left else "does not hold"))
        t = tensor.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        left = self._left[name]
        if len(data) > left or (not part and len(data) != left):
            raise RuntimeError(f"{name}: {len(data)} bytes, planned {left} more")
        pos = len(self.header) + self.offsets[name][1] - left
        if len(data):
            with disk_full_is_clear(self.path):
                _pwrite_all(self._fd, memoryview(data), pos)
            self._unsynced.append((pos, len(data)))
        self._left[name] = left - len(data)
        if not self._left[name]:
            self._pending.discard(name)
        if sum(n for _, n in self._unsynced) >= WRITEBACK_STEP:
            self._start_writeback()

    def _start_writeback(self) -> None:
        if hasattr(os, "posix_fadvise"):
            for pos, n in self._unsynced:
                os.posix_fadvise(self._fd, pos, n, os.POSIX_FADV_DONTNEED)
        self._unsynced = []

    @property
    def done(self) -> bool:
        return not self._pending

    def close(self) -> None:
        """Flush to disk; the caller renames the file into place only after this."""
        with disk_full_is_clear(self.path):
            os.fsync(self._fd)
        os.close(self._fd)
        if delay := float(os.environ.get(SLOW_WRITE_ENV) or 0):
            time.sleep(delay)  # test-only (see SLOW_WRITE_ENV)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def shard_matches(path: Path, header: bytes) -> bool:
    """True when a finished shard on disk has exactly this header and its full size (resume)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                return False
        (n,) = struct.unpack("<Q", header[:8])
        metas = parse_header_json(header[8:], path.name)
        need = 8 + n + max((m.data_offsets[1] for m in metas.values()), default=0)
        return path.stat().st_size == need
    except (OSError, InputError):
        return False
