"""Merged tensors reach a direct-I/O shard without a copy: the output arena carves each one at the
place in a 4 KiB block its bytes have in the file; what is not placed so is copied by torch (off
the GIL) and still gives the buffered path's bytes. Reads give the same tensors as safetensors."""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_metagpt
from hf_metagpt import constants
from hf_metagpt.demo.tiny import TinySpec, build_family
from helpers import shards
from hf_metagpt.engine import writer
from hf_metagpt.engine.reader import BLOCK, read_tensors
from hf_metagpt.safetensors_io import read_header


def test_carved_tensors_share_their_file_offsets_place_in_a_block():
    arena = writer.OutputArena(slots=1)
    placement = [(6000, 136), (4096 * 3, 0), (64, 4000), (20000, 2)]
    for turn in range(3):  # fresh memory first, then the reused buffer (grown to fit any address)
        carve = arena.take(placement)
        a = carve((3000,), torch.bfloat16)
        b = carve((3072,), torch.float32)
        c = carve((16,), torch.float32)
        odd = carve((3,), torch.int64)  # 24 bytes: no place asked for it
        d = carve((5000,), torch.float32)
        assert a.data_ptr() % BLOCK == 136 and b.data_ptr() % BLOCK == 0 and c.data_ptr() % BLOCK == 4000
        # 20000 bytes of float32 cannot start 2 bytes into a block: carved as before, 64-aligned
        assert d.data_ptr() % 64 == 0 and odd.data_ptr() % 64 == 0
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (a, b, c, odd, d))
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
        if turn:
            assert len({t.untyped_storage().data_ptr() for t in (a, b, c, odd, d)}) == 1  # one buffer, carved


def test_a_place_is_taken_by_the_first_request_of_its_size():
    carve = writer.OutputArena(slots=1).take([(4096, 8), (8192, 16), (4096, 24)])
    ints = carve((1024,), torch.int32)  # asked first (a GPU kernel copies integer buffers first)
    floats = carve((2048,), torch.float32)
    other = carve((2048,), torch.bfloat16)
    assert (ints.data_ptr() % BLOCK, floats.data_ptr() % BLOCK, other.data_ptr() % BLOCK) == (8, 16, 24)


def _spy_whole(monkeypatch) -> list[tuple[int, bool, bool]]:
    """(bytes, sent in place, read-only) of every run of whole blocks a direct shard writes."""
    calls: list[tuple[int, bool, bool]] = []
    real = writer.DirectFile._whole

    def spy(self, data, pos):
        before = self.bounced
        real(self, data, pos)
        calls.append((len(data), self.bounced == before, data.readonly))

    monkeypatch.setattr(writer.DirectFile, "_whole", spy)
    return calls


@pytest.mark.parametrize("method,granularity,unit_mb", [
    ("metagpt", "layer", None), ("metagpt", "model", "0.2"), ("task_arithmetic", "model", "0.2"), ("ties", "model", None)])
def test_arena_tensors_are_written_without_a_bounce_copy_and_give_the_buffered_bytes(
        tmp_path, monkeypatch, method, granularity, unit_mb):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    spec = TinySpec(hidden_size=128, intermediate_size=352, vocab_size=250)
    base, fts = build_family(tmp_path / "fam", n_models=3, spec=spec)
    if unit_mb:  # pieces smaller than a tensor: the embeddings and MLP matrices come in row slabs
        monkeypatch.setenv(constants.UNIT_ENV, unit_mb)
    args = dict(base=str(base), models=[str(f) for f in fts], method=method, device="cpu", progress=False,
                max_shard_size="300KB", granularity=granularity)
    calls = _spy_whole(monkeypatch)
    hf_metagpt.merge(output=str(tmp_path / "direct"), **args)
    if not calls:
        pytest.skip("this file system refuses O_DIRECT writes")
    tensors = sum(n for n, _, readonly in calls if not readonly)
    bounced = sum(n for n, in_place, readonly in calls if not readonly and not in_place)
    size = sum(p.stat().st_size for p in (tmp_path / "direct").glob("*.safetensors"))
    assert tensors > 0.8 * size > 1_000_000  # most merged bytes went through `_whole`…
    if method == "ties":  # the method kernel's tensors are its own, not carved: copied through the bounce
        assert bounced > 0.5 * size
    else:
        assert bounced == 0  # …straight from where the arena carved them
    monkeypatch.setenv(constants.DIRECT_ENV, "0")
    hf_metagpt.merge(output=str(tmp_path / "buffered"), **args)
    direct = shards(tmp_path / "direct")
    assert len(direct) > 2 and direct == shards(tmp_path / "buffered")


def test_memory_not_placed_like_the_file_goes_through_the_bounce_buffer_with_the_same_bytes(tmp_path):
    t = torch.arange(3 * BLOCK + 700, dtype=torch.int16)
    path = tmp_path / "s.safetensors"
    w = writer.ShardWriter(path, [("a", "U8", (6,)), ("t", "I16", tuple(t.shape))])
    if not isinstance(w._file, writer.DirectFile):
        w.abort()
        pytest.skip("this file system refuses O_DIRECT writes")
    pos = len(w.header) + w.offsets["t"][0]
    raw = torch.empty(t.numel() * 2 + BLOCK + 2, dtype=torch.uint8)
    at = (pos + 2 - raw.data_ptr()) % BLOCK  # two bytes past the file's place in a block
    src = raw[at: at + t.numel() * 2].view(torch.int16)
    src.copy_(t)
    w.write("t", src)
    w.write("a", torch.arange(6, dtype=torch.uint8))
    whole = (pos + t.numel() * 2) // BLOCK * BLOCK - -(-pos // BLOCK) * BLOCK
    assert w.bounced >= whole > 0
    w.close()
    got = load_file(path)
    assert torch.equal(got["t"], t) and got["a"].tolist() == [0, 1, 2, 3, 4, 5]


def test_read_views_equal_safetensors_for_mixed_dtypes_and_odd_offsets(tmp_path):
    rng = random.Random(1)
    tensors = {}
    for i in range(40):
        dtype = rng.choice([torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool])
        shape = rng.choice([(), (0,), (rng.randint(1, 9),), (rng.randint(1, 5), rng.randint(1, 7)), (2, 0, 3),
                            (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 5))])
        tensors[f"t{i:02d}"] = (torch.randn(shape) * 50).to(dtype)
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    expected = load_file(path)
    metas = list(read_header(path).values())
    views = 0
    for shift in (0, 1, 2, 6):  # a buffer starting at every alignment
        pool = torch.empty(1 << 16, dtype=torch.uint8)
        buf = pool[shift:]
        pick = rng.sample(metas, 25)  # some runs back to back, some apart
        got = read_tensors(path, pick, buf)
        assert sorted(got) == sorted(m.name for m in pick)
        for m in pick:
            g, e = got[m.name], expected[m.name]
            assert g.dtype == e.dtype and g.shape == e.shape and g.is_contiguous() and torch.equal(g, e), m.name
            if g.numel():  # in place, unless its bytes landed where its dtype cannot start (then a copy)
                in_place = g.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
                assert in_place or g.element_size() > 1, m.name
                views += in_place
    assert views > 30


def test_a_non_contiguous_tensor_is_written_as_its_contiguous_bytes(tmp_path):
    t = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48).t()  # a transposed view
    assert not t.is_contiguous()
    path = tmp_path / "s.safetensors"
    w = writer.ShardWriter(path, [("t", "F32", (48, 64)), ("empty", "BF16", (0, 3))])
    w.write("t", t)
    w.write("empty", torch.empty(0, 3, dtype=torch.bfloat16))
    w.close()
    got = load_file(path)
    assert torch.equal(got["t"], t) and got["empty"].shape == (0, 3)
