"""GPU staging (`engine.staging`, HF_METAGPT_GPU_STAGING=1): each piece copied to the device on the
reader thread, the kernel merging from those copies — the same bytes as the plain GPU code.

Without CUDA the staged code runs on the CPU device (a copy is a clone): the lookups, the slots and
the threads are the ones a GPU run uses. With CUDA (the lent machine) the last tests compare the
staged and plain CUDA merges and the CPU merge.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.engine import merging, staging
from hf_metagpt.engine.reader import BufferPool

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
#: the engine's own kernel choice (the fixtures below swap in the GPU kernel's code)
PLAIN_CHOOSE = merging.choose_kernel


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from hf_metagpt.demo.tiny import TinySpec, build_family

    return build_family(tmp_path_factory.mktemp("staging-family"), n_models=3,
                        spec=TinySpec(hidden_size=128, intermediate_size=256, num_hidden_layers=3, vocab_size=512,
                                      max_shard_size="1MB"))


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("model*.safetensors"))}


#: the time account of the last `_merge` (its "staging" counts)
ACCOUNTS: list[dict] = []


def _merge(family, out: Path, granularity: str, device: str = "cpu") -> tuple[dict, dict]:
    base, fts = family
    res = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), granularity=granularity,
                           device=device, progress=False)
    ACCOUNTS.append(res.timeline.as_dict())
    return _digests(out), dict(res.coefficients)


@pytest.fixture
def stagers(monkeypatch):
    """Every `Stager` a merge makes (the GPU kernel's code on the CPU device, staging on)."""
    made: list[staging.Stager] = []
    monkeypatch.setattr(merging, "choose_kernel", lambda *a: (
        merging.GpuFusedKernel if PLAIN_CHOOSE(*a) is merging.FusedKernel else PLAIN_CHOOSE(*a)))

    class Recorded(staging.Stager):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(merging, "Stager", Recorded)
    monkeypatch.setenv("HF_METAGPT_GPU_STAGING", "1")
    return made


@pytest.mark.parametrize("granularity, unit_mb", [("model", None), ("layer", "0.05"), ("tensor", None)])
def test_staged_gpu_kernel_gives_the_cpu_kernel_bytes_from_copies_made_on_the_reader_thread(
        family, tmp_path, monkeypatch, stagers, granularity, unit_mb):
    if unit_mb:  # pieces smaller than a tensor: row slabs
        monkeypatch.setenv("HF_METAGPT_UNIT_MB", unit_mb)
    with monkeypatch.context() as m:
        m.delenv("HF_METAGPT_GPU_STAGING")
        m.setattr(merging, "choose_kernel", PLAIN_CHOOSE)
        want = _merge(family, tmp_path / "cpu", granularity)
    assert "staging" not in ACCOUNTS[-1]  # a run that does not stage says nothing of it
    got = _merge(family, tmp_path / "staged", granularity)
    assert want[0] and got == want
    (stager,) = stagers
    # every pooled input of every piece the kernel uploaded was found staged, none copied again
    assert stager.copied > 0 and stager.hits > 0 and stager.misses == 0
    assert ACCOUNTS[-1]["staging"] == {"copied": stager.copied, "hits": stager.hits, "misses": 0}
    assert stager.threads and all(name.startswith("hf-metagpt-read") for name in stager.threads), stager.threads


def test_staging_is_off_by_default_and_only_the_gpu_kernel_stages(family, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_METAGPT_GPU_STAGING", raising=False)
    assert not staging.staging_enabled()
    monkeypatch.setenv("HF_METAGPT_GPU_STAGING", "1")
    assert staging.staging_enabled()
    assert merging.MergeKernel.stager is None and merging.FusedKernel.stager is None
    made = []
    monkeypatch.setattr(merging, "Stager", lambda device: made.append(device) or staging.Stager(device))
    _merge(family, tmp_path / "cpu", "layer")  # the CPU kernel: nothing staged
    assert made == []


def _piece(values: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    """One input dict per list, its tensors side by side in one buffer (as the feed's pool holds them)."""
    raws = []
    for vals in values:
        buf = torch.tensor(vals, dtype=torch.float32)
        raws.append({"a": buf[:2].view(1, 2), "b": buf[2:]})
    return raws


def test_a_staged_piece_is_a_snapshot_found_by_its_own_dicts_and_dropped_two_reads_later():
    s = staging.Stager(torch.device("cpu"))
    first, second, third = _piece([[1, 2, 3], [4, 5, 6]]), _piece([[7, 8, 9]]), _piece([[0, 0, 1]])
    s.stage([None, *first])
    found = s.lookup(first[0])
    assert found is not None
    first[0]["b"].fill_(-1)  # the reader reusing the host buffer later does not change the staged copy
    assert torch.equal(staging.device_view(first[0]["a"], found), torch.tensor([[1.0, 2.0]]))
    b = staging.device_view(first[0]["b"], found)  # the copy made at stage time, not the host bytes
    assert b.tolist() == [3.0] and b.data_ptr() != first[0]["b"].data_ptr()
    assert s.lookup({"a": first[0]["a"], "b": first[0]["b"]}) is None  # another dict: not this piece
    s.stage([*second])
    s.stage([*third])
    assert s.lookup(first[0]) is None and s.lookup(first[1]) is None  # its slot was read into again
    assert s.lookup(second[0]) is not None and s.lookup(third[0]) is not None
    assert s.copied == 4


def test_spans_cover_each_buffer_once_and_skip_what_cannot_be_copied_as_bytes():
    (raw,) = _piece([[1, 2, 3, 4]])
    raw["t"] = torch.arange(6.0).view(2, 3).t()  # not contiguous: copied by the kernel itself
    found = staging.spans([raw, None])
    assert len(found) == 1
    (_, lo, hi), = found.values()
    assert (lo, hi) == (0, 4 * 4)
    assert staging.spans([raw], names=["b"])[raw["b"].untyped_storage().data_ptr()][1:] == [0, 16]  # aligned down
    copies = {k: (torch.empty(0, dtype=torch.uint8).set_(st, lo, (hi - lo,)).clone(), lo)
              for k, (st, lo, hi) in found.items()}
    assert staging.device_view(raw["t"], copies) is None


def test_a_tensor_keeps_its_alignment_in_the_device_copy_after_an_odd_sized_one():
    """Mixed dtypes side by side (one bf16 value, then fp32 values at a 4-byte boundary): the copy
    starts at an aligned byte, so the fp32 tensor views as fp32 there (it failed when the copy started
    at the bf16 value's byte 2), in the staged and in the kernel's own copies."""
    buf = torch.zeros(256, dtype=torch.uint8)
    buf[66:68].view(torch.bfloat16).fill_(1.5)
    buf[68:76].view(torch.float32).copy_(torch.tensor([2.5, -3.0]))
    raw = {"a": buf[66:68].view(torch.bfloat16), "b": buf[68:76].view(torch.float32)}
    s = staging.Stager(torch.device("cpu"))
    s.stage([raw])
    found = s.lookup(raw)
    assert staging.device_view(raw["b"], found).tolist() == [2.5, -3.0]
    assert staging.device_view(raw["a"], found).tolist() == [1.5]
    (_, lo, hi), = staging.spans([raw]).values()
    assert (lo, hi) == (64, 76) and lo % staging.SPAN_ALIGN == 0


def test_the_gpu_kernel_uploads_what_was_not_staged(family, tmp_path, monkeypatch, stagers):
    """A piece read outside the feed's pool (or not staged) is copied by the kernel, counted as a miss."""
    monkeypatch.setattr(staging.Stager, "stage", lambda self, raws: None)
    with monkeypatch.context() as m:
        m.delenv("HF_METAGPT_GPU_STAGING")
        want = _merge(family, tmp_path / "plain", "model")
    got = _merge(family, tmp_path / "unstaged", "model")
    assert got == want
    (stager,) = stagers
    assert stager.hits == 0 and stager.misses > 0
    assert ACCOUNTS[-1]["staging"] == {"copied": 0, "hits": 0, "misses": stager.misses}


def test_pool_buffers_are_page_locked_only_when_asked():
    assert not BufferPool().take(16).is_pinned()
    if torch.cuda.is_available():
        assert BufferPool(pinned=True).take(16).is_pinned()


def test_a_staged_gpu_run_writes_from_a_page_locked_output_arena(tmp_path, monkeypatch):
    """The merged tensors come back into page-locked memory when the GPU stages (`writer.OutputArena`);
    the sink is built with it (the merge is stopped there: this CPU-only torch cannot page-lock)."""
    from hf_metagpt.demo.tiny import TinySpec, build_family
    from hf_metagpt.engine.writer import OutputArena, ShardSink

    class Built(Exception):
        pass

    plain = ShardSink.__init__

    def spy(self, *a, **kw):
        plain(self, *a, **kw)
        raise Built(self.arena.pinned)

    monkeypatch.setattr(ShardSink, "__init__", spy)
    base, fts = build_family(tmp_path / "fam", n_models=1, spec=TinySpec(hidden_size=64, intermediate_size=128,
                                                                          num_hidden_layers=1, vocab_size=128))
    merge = lambda: hf_metagpt.merge(base=str(base), models=[str(fts[0])], output=str(tmp_path / "o"),  # noqa: E731
                                     device="cpu", progress=False)
    with pytest.raises(Built) as plain_run:
        merge()
    stager = staging.Stager(torch.device("cpu"))
    stager.pinned = True  # as on a CUDA device
    monkeypatch.setattr(merging.FusedKernel, "stager", stager)
    with pytest.raises(Built) as staged_run:
        merge()
    assert plain_run.value.args == (False,) and staged_run.value.args == (True,)
    assert not OutputArena().pinned
    if torch.cuda.is_available():
        arena = OutputArena(pinned=True)
        arena.take()((64,), torch.uint8)  # the first turn learns the size
        arena.take()
        assert arena.take()((64,), torch.uint8).is_pinned()


# --------------------------------------------------------------------------- on a CUDA GPU (the lent machine)


@cuda
@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
def test_staged_cuda_merge_gives_the_plain_cuda_and_the_cpu_bytes(family, tmp_path, monkeypatch, granularity):
    made: list[staging.Stager] = []

    class Recorded(staging.Stager):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    cpu = _merge(family, tmp_path / "cpu", granularity)
    plain = _merge(family, tmp_path / "cuda", granularity, "cuda")
    monkeypatch.setenv("HF_METAGPT_GPU_STAGING", "1")
    monkeypatch.setattr(merging, "Stager", Recorded)
    staged = _merge(family, tmp_path / "staged", granularity, "cuda")
    assert cpu[0] and staged[0] == plain[0] == cpu[0]
    (stager,) = made
    assert stager.pinned and stager.hits > 0 and stager.misses == 0
    assert all(name.startswith("hf-metagpt-read") for name in stager.threads)


@cuda
def test_cuda_staged_copies_survive_the_reader_reusing_its_buffer():
    """The staged copy is complete when `stage` returns: overwriting the pinned host buffer after it
    (what the reader does two reads later) never reaches the device copy."""
    s = staging.Stager(torch.device("cuda"))
    host = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    raw = {"x": host.view(torch.float32)}
    s.stage([raw])
    host.fill_(0)
    g = staging.device_view(raw["x"], s.lookup(raw))
    assert g.device.type == "cuda" and bool((g.view(torch.uint8) == 7).all())
    assert threading.current_thread().name in s.threads
