"""Each Triton kernel against its plain PyTorch reference (and the reference against transformers).

On CPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1) on small
fp32 shapes. On a GPU machine, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` also runs them
compiled, on realistic shapes in fp16 and bf16.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (pip install 'lmcor[test]')")

from lmcor.kernels.pack import pack, pack_reference  # noqa: E402
from lmcor.kernels.packed_attention import (  # noqa: E402
    packed_attention,
    packed_attention_reference,
    relative_buckets,
)
from lmcor.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference  # noqa: E402

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device, with TRITON_INTERPRET=0")
# The CPU cases run the kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with it off,
# Triton compiles for a GPU and cannot take their CPU tensors.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)")
# (device, dtype, lengths, heads, head_dim, absolute and relative tolerance)
CASES = [
    pytest.param("cpu", torch.float32, [37, 5, 20], 2, 24, 1e-4, id="interpreter-fp32", marks=interpreted),
    pytest.param("cuda", torch.float16, [200, 17, 96, 130] * 4, 12, 64, 2e-2, id="gpu-fp16", marks=needs_gpu),
    pytest.param("cuda", torch.bfloat16, [200, 17, 96, 130] * 4, 12, 64, 5e-2, id="gpu-bf16", marks=needs_gpu),
]


def _ragged(lengths: list[int], device: str, vocab: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    segments = torch.zeros_like(ids)
    for b, n in enumerate(lengths):  # a source, then up to 5 candidates
        cuts = sorted(torch.randint(1, max(2, n), (5,), generator=g).tolist())
        for c, cut in enumerate(cuts, start=1):
            segments[b, cut:n] = c
    return ids.to(device), segments.to(device), torch.tensor(lengths).to(device)


@pytest.mark.parametrize("device, dtype, lengths, heads, head_dim, tol", CASES)
def test_pack_matches_reference(device, dtype, lengths, heads, head_dim, tol):
    ids, segments, lengths_t = _ragged(lengths, device)
    table = torch.randn(300, heads * head_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = pack(ids, segments, lengths_t, table)
    expected = pack_reference(ids, segments, lengths_t, table)
    for a, b in zip(got, expected):
        assert torch.equal(a.cpu(), b.cpu())  # a gather and a copy: exact
    assert got[0].shape[0] == sum(lengths)


@pytest.mark.parametrize("segment_mode", [False, True])
@pytest.mark.parametrize("device, dtype, lengths, heads, head_dim, tol", CASES)
def test_packed_attention_matches_reference(device, dtype, lengths, heads, head_dim, tol, segment_mode):
    ids, segments, lengths_t = _ragged(lengths, device)
    g = torch.Generator().manual_seed(2)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(device, dtype) for _ in range(3))
    bias = torch.randn(32, heads, generator=g).to(device, dtype)
    _, _, packed_segments, cu = pack_reference(ids.cpu(), segments.cpu(), lengths_t.cpu(), torch.zeros(300, 1))
    cu, packed_segments = cu.to(device), packed_segments.to(device)
    scale = head_dim**-0.5  # T5 itself uses 1.0; random inputs need the usual scale to stay well-conditioned
    got = packed_attention(q, k, v, cu, max(lengths), bias, segments=packed_segments, segment_mode=segment_mode,
                           scale=scale)
    expected = packed_attention_reference(q, k, v, cu, bias, segments=packed_segments, segment_mode=segment_mode,
                                          scale=scale)
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


@interpreted
def test_kernels_take_inputs_of_any_strides():
    """A dense but transposed input: the outputs are written in row order, not in the input's
    (an output shaped like the input's strides read back scrambled)."""
    ids, segments, lengths_t = _ragged([9, 14], "cpu", seed=5)
    _, _, _, cu = pack_reference(ids, segments, lengths_t, torch.zeros(300, 1))
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 23, 8, generator=g).transpose(0, 1) for _ in range(3))  # (tokens, heads, dim), strided
    bias = torch.randn(32, 2, generator=g)
    got = packed_attention(q, k, v, cu, 14, bias, scale=8**-0.5)
    expected = packed_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), cu, bias, scale=8**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    x, residual = torch.randn(48, 7, generator=g).T, torch.randn(7, 48, generator=g)
    weight = torch.rand(48, generator=g) + 0.5
    for got, expected in zip(add_rmsnorm(x, residual, weight), add_rmsnorm_reference(x.contiguous(), residual, weight)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@interpreted
def test_segment_mode_isolates_candidates():
    ids, segments, lengths = _ragged([30], "cpu", seed=4)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(30, 1, 16, generator=g) for _ in range(3))
    _, _, seg, cu = pack_reference(ids, segments, lengths, torch.zeros(300, 1))
    bias = torch.zeros(32, 1)
    base = packed_attention(q, k, v, cu, 30, bias, segments=seg, segment_mode=True)
    last = int(seg.max())
    v2 = v.clone()
    v2[seg == last] += 10.0  # change only the last candidate's values
    moved = packed_attention(q, k, v2, cu, 30, bias, segments=seg, segment_mode=True)
    others = seg != last
    assert torch.allclose(base[others], moved[others]) and not torch.allclose(base[~others], moved[~others])


def test_bucket_function_is_t5s():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 301)[None, :] - torch.zeros(1, 1, dtype=torch.long)
    for buckets, distance, bidirectional in ((32, 128, True), (32, 128, False), (64, 256, True)):
        expected = T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=buckets,
                                                         max_distance=distance)
        assert torch.equal(relative_buckets(relative, buckets, distance, bidirectional), expected)


@interpreted
def test_the_kernel_and_its_reference_are_t5_encoder_self_attention():
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=32, is_decoder=False)
    attention = T5Attention(config, has_relative_attention_bias=True).eval()
    hidden = torch.randn(1, 23, 32)
    with torch.no_grad():
        expected = attention(hidden, cache_position=torch.arange(23))[0]
        q, k, v = (layer(hidden)[0].view(23, 4, 8) for layer in (attention.q, attention.k, attention.v))
        cu = torch.tensor([0, 23], dtype=torch.int32)
        table = attention.relative_attention_bias.weight
        for mixed in (packed_attention(q, k, v, cu, 23, table, max_distance=128),
                      packed_attention_reference(q, k, v, cu, table, max_distance=128)):
            torch.testing.assert_close(attention.o(mixed.reshape(1, 23, 32)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device, dtype, tol", [
    pytest.param("cpu", torch.float32, 1e-5, id="interpreter-fp32", marks=interpreted),
    pytest.param("cuda", torch.float16, 1e-2, id="gpu-fp16", marks=needs_gpu),
    pytest.param("cuda", torch.bfloat16, 2e-2, id="gpu-bf16", marks=needs_gpu),
])
def test_add_rmsnorm_matches_reference_and_t5(device, dtype, tol):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    rows, dim = (7, 48) if device == "cpu" else (4096, 768)
    g = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(rows, dim, generator=g).to(device, dtype) for _ in range(2))
    norm = T5LayerNorm(dim).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g).to(device, dtype) + 0.5)
        total, normed = add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
        ref_total, ref_normed = add_rmsnorm_reference(x, residual, norm.weight, norm.variance_epsilon)
        t5 = norm(x + residual)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(normed.float(), ref_normed.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(ref_normed.float(), t5.float(), atol=tol, rtol=tol)


@interpreted
@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_packed_encoder_equals_the_t5_encoder(feed_forward):
    from lmcor.kernels.encoder import EncoderWeights, encode_packed, unpack
    from transformers import T5Config, T5EncoderModel

    # max_distance 16: the inputs' distances go past it, into the buckets that saturate; a request of one token
    config = T5Config(vocab_size=300, d_model=32, d_kv=12, num_heads=4, d_ff=48, num_layers=2,
                      feed_forward_proj=feed_forward, dropout_rate=0.0, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16)
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()
    lengths = [29, 6, 1, 17]
    ids, segments, lengths_t = _ragged(lengths, "cpu", seed=6)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths_t[:, None]).long()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        packed, cu = encode_packed(EncoderWeights.from_t5(model), ids, segments, lengths_t)
    got = unpack(packed, cu, ids.shape[1])
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, :n], expected[b, :n], atol=1e-4, rtol=1e-4)


@interpreted
def test_corrector_with_the_packed_encoder_gives_the_onnx_tokens(checkpoints, tmp_path):
    from conftest import make_requests
    from lmcor.export import export_corrector

    from lmcor import Corrector

    bundle = tmp_path / "bundle"
    export_corrector(checkpoints["t5v11"], bundle, packed_encoder=True)
    requests = make_requests(6, seed=8)
    onnx = Corrector.load(bundle, encoder="onnx").correct_batch(requests, max_new_tokens=12, batch_size=3)
    packed = Corrector.load(bundle, encoder="packed")
    assert packed.packed is not None
    got = packed.correct_batch(requests, max_new_tokens=12, batch_size=3)
    assert [c.token_ids for c in got] == [c.token_ids for c in onnx]
    assert Corrector.load(bundle).packed is None  # auto: the ONNX encoder without CUDA
    if not torch.cuda.is_available():  # ONNX Runtime on CUDA, PyTorch without: auto takes the ONNX encoder
        from lmcor.runtime.corrector import _packed_encoder
        from lmcor.runtime.errors import BundleError

        assert _packed_encoder(bundle, packed.manifest, "cuda", "auto") is None
        with pytest.raises(BundleError, match="has no CUDA device"):
            _packed_encoder(bundle, packed.manifest, "cuda", "packed")
    from lmcor.export.half import convert_bundle
    from lmcor.runtime.errors import ExportError

    with pytest.raises(ExportError, match="packed encoder's weights are fp32"):  # they would replace the fp16 encoder
        convert_bundle(bundle, tmp_path / "fp16", "fp16")
    assert not (tmp_path / "fp16").exists()


def test_encoder_states_reach_onnx_runtime_through_dlpack_without_a_copy():
    """The CUDA path hands the packed encoder's states over by DLPack (here on the CPU: the same call)."""
    from lmcor.runtime.encode import _from_dlpack

    states = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    value = _from_dlpack(states)
    assert value.shape() == [2, 3, 4] and (value.numpy() == states.numpy()).all()
    states[0, 0, 0] = -1.0  # one memory: ONNX Runtime reads what the encoder wrote
    assert value.numpy()[0, 0, 0] == -1.0
