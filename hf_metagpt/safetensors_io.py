"""Safetensors headers: parsed, built, and the dtype names around them (a leaf module).

Reads go through `safetensors.safe_open` (lazy, per tensor). What the library lacks is here:

* `read_header` parses the 8-byte length + JSON header of a local file without mapping it, so
  local and remote inputs (`huggingface_hub.get_safetensors_metadata`) give the same
  `TensorMeta`, and a corrupt file gets a message that names it.
* `build_header` writes the header of a shard before its tensors exist: `engine.writer.ShardWriter`
  then writes each tensor's bytes at its offset as soon as it is merged (`safetensors.torch.save_file`
  needs every tensor of a shard in memory at once, a 5 GB buffer per shard).
* `ST_TO_TORCH`: safetensors dtype codes and torch dtypes (the names a config.json uses: `dtype_names`),
  built when first used: the module itself imports without torch (the read-ahead parses headers
  while the CLI is still importing torch).
"""
from __future__ import annotations

import errno
import json
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from typing import TYPE_CHECKING, Any

from .errors import InputError, OutputError

if TYPE_CHECKING:
    import torch

    #: safetensors code → torch dtype, and the reverse (built on first use: `__getattr__`)
    ST_TO_TORCH: dict[str, torch.dtype]
    TORCH_TO_ST: dict[torch.dtype, str]

#: safetensors dtype codes: the torch dtype of each (by attribute name) and its bytes per element.
#: Kept as names so that this module imports without torch: the read-ahead (`engine.readahead`)
#: parses headers while the CLI is still importing it.
_CODES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


def _torch_dtypes() -> "dict[str, torch.dtype]":
    """Code → torch dtype, built (and torch imported) on first use, then kept as `ST_TO_TORCH`."""
    table = globals().get("ST_TO_TORCH")
    if table is None:
        import torch

        table = {code: getattr(torch, attr) for code, (attr, _) in _CODES.items()}
        globals().update(ST_TO_TORCH=table, TORCH_TO_ST={v: k for k, v in table.items()})
    return table


def __getattr__(name: str) -> Any:
    """`ST_TO_TORCH` (code → torch dtype) and `TORCH_TO_ST` (the reverse), built on first use (PEP 562)."""
    if name in ("ST_TO_TORCH", "TORCH_TO_ST"):
        _torch_dtypes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FLOATING = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
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
    def torch_dtype(self) -> "torch.dtype":
        return _torch_dtypes()[self.dtype]


def dtype_itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code (KeyError for a code this module does not know)."""
    return _CODES[code][1]


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
            if not isinstance(dtype, str) or dtype not in _CODES:
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


