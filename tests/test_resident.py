"""The ragged decoder with its caches on the device (`runtime/resident.py`), run on the CPU with
`LMCOR_CACHES=device`: the same tokens, decoder calls and accepted drafts as the host layout (which
test_parity proves equal to `generate`), offline, one at a time, in beam search and online; and its
indexed cache write equal to the host reference; and the spare room of the ragged decoder's buffers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_requests
from lmcor.runtime.decode import RaggedDecoder, _write_rows, cache_layout, open_decoder
from lmcor.runtime.errors import InputError
from lmcor.runtime.resident import ResidentDecoder, write_rows

from lmcor import Corrector

INPUTS = make_requests(24, seed=11)
ROOT = Path(__file__).resolve().parents[1]


def _runs(corrector: Corrector, requests) -> list:
    return [corrector.correct_batch(requests, batch_size=8), corrector.correct_batch(requests[:8], batch_size=1),
            corrector.correct_batch(requests[:8], batch_size=4, num_beams=3),
            [f.result() for f in [corrector.engine.submit(r) for r in requests]]]


def _same(ours, theirs) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert (a.text, a.token_ids, a.fallback) == (b.text, b.token_ids, b.fallback)
        assert (a.stats.decoder_calls, a.stats.drafted_tokens, a.stats.accepted_tokens) == (
            b.stats.decoder_calls, b.stats.drafted_tokens, b.stats.accepted_tokens)


@pytest.mark.parametrize("source", ["tiny", "default"])
def test_device_caches_give_the_host_layouts_tokens(source, bundles, monkeypatch):
    """A tiny random T5 (outputs of many lengths), and the shipped corrector on real requests (drafts
    accepted, rows joining and leaving, the fallback)."""
    if source == "tiny":
        path, requests = bundles["t5"], INPUTS
    else:
        lines = (ROOT / "recipes" / "splits" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:48]
        path, requests = None, [{k: json.loads(line)[k] for k in ("source", "candidates")} for line in lines]
    runs = {}
    for layout, kind in (("host", RaggedDecoder), ("device", ResidentDecoder)):
        monkeypatch.setenv("LMCOR_CACHES", layout)
        corrector = Corrector.load(path)  # its own engine thread, whose decoder takes this layout
        try:
            runs[layout] = _runs(corrector, requests)
            assert type(open_decoder(corrector.sessions, corrector.manifest)) is kind
        finally:
            corrector.engine.close()
    for ours, theirs in zip(runs["device"], runs["host"]):
        _same(ours, theirs)
    if source == "default":  # a trained model accepts drafts: rows advance by several tokens a call
        assert sum(r.stats.accepted_tokens for r in runs["device"][0]) > 0


def test_device_write_rows_equals_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(40):
        rows, heads, room, dim, new = (int(x) for x in rng.integers(1, 6, size=5))
        first = int(rng.integers(0, 3))
        lengths = rng.integers(0, room + 1, size=rows).astype(np.int64)
        caches = [rng.standard_normal((first + rows, heads, room + new, dim)).astype(np.float32) for _ in range(3)]
        presents = [rng.standard_normal((rows, heads, new, dim)).astype(np.float32) for _ in range(3)]
        expected = [c.copy() for c in caches]
        _write_rows(expected, presents, lengths, first)
        tensors = [torch.from_numpy(c.copy()) for c in caches]
        write_rows(tensors, [torch.from_numpy(p) for p in presents], lengths, first)
        for got, want in zip(tensors, expected):
            assert np.array_equal(got.numpy(), want)


def test_cache_layout_follows_the_device_and_the_variable(monkeypatch):
    monkeypatch.delenv("LMCOR_CACHES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a CUDA build of PyTorch on a GPU says
    assert (cache_layout("cpu"), cache_layout("cuda")) == ("host", "device")
    monkeypatch.setenv("LMCOR_CACHES", "device")
    assert cache_layout("cpu") == "device"
    monkeypatch.setenv("LMCOR_CACHES", "gpu")
    with pytest.raises(InputError, match="LMCOR_CACHES must be host or device"):
        cache_layout("cpu")


@pytest.mark.parametrize("torch_is", ["missing", "cpu-only"])
def test_cuda_without_a_cuda_pytorch_keeps_the_caches_in_host_memory(torch_is, monkeypatch, caplog):
    """onnxruntime-gpu without PyTorch, or beside a CPU-only PyTorch, still decodes (the host layout),
    and says what it costs once."""
    import logging
    import sys

    from lmcor.runtime import decode

    monkeypatch.delenv("LMCOR_CACHES", raising=False)
    if torch_is == "missing":
        monkeypatch.setitem(sys.modules, "torch", None)  # import fails
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(decode, "_warned_no_torch", False)
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        assert cache_layout("cuda") == cache_layout("cuda") == "host"
    assert sum("needs PyTorch built with CUDA" in r.getMessage() for r in caplog.records) == 1


def test_a_longer_source_joining_keeps_the_spare_rows():
    """Rows join into spare slots; a source wider than the batch's re-allocates the buffers at the
    new width, with as many slots as before (the next row to join must not re-allocate them again)."""
    corrector = Corrector.load(None)
    decoder = open_decoder(corrector.sessions, corrector.manifest)
    shape = corrector.manifest.decoder

    def join(rows: int, source: int) -> None:
        cross = [np.ones((rows, shape.num_heads, source, shape.head_dim), dtype=np.float32) for _ in decoder._cross]
        decoder.join(cross, np.ones((rows, source), dtype=np.int64))

    join(3, 10)
    join(1, 10)  # past the first rows' exact buffers: twice the slots
    assert decoder._mask.shape == (6, 10)
    join(1, 20)  # wider: the same slots
    assert decoder._mask.shape == (6, 20) and decoder.rows == 5
    buffers = list(decoder._keys_values)
    join(1, 15)  # fits
    assert all(a is b for a, b in zip(decoder._keys_values, buffers)) and decoder.rows == 6
    assert decoder._mask[:, :20].sum(axis=1).tolist() == [10, 10, 10, 10, 20, 15]
    join(2, 30)  # more rows and wider at once: twice the slots, the new width
    assert decoder._mask.shape == (12, 30) and decoder.rows == 8
    assert decoder._mask[:8].sum(axis=1).tolist() == [10, 10, 10, 10, 20, 15, 30, 30]
