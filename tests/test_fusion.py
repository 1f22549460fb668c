"""The fused T5 encoder (export/fusion.py): ONNX Runtime's Attention, skip-RMS-norm and FastGelu
operators, with the relative position bias in standard operators, against PyTorch's encoder."""

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lmcor.export.fusion import fuse_t5_encoder
from transformers import AutoModelForSeq2SeqLM

T5_ARCHITECTURES = ("t5", "t5v11")


@pytest.mark.parametrize("arch", T5_ARCHITECTURES)
def test_fp32_bundle_has_the_fused_encoder(bundles, arch):
    graph = onnx.load(str(bundles[arch] / "encoder_model.onnx"), load_external_data=False).graph
    kinds = {node.op_type for node in graph.node}
    assert "Attention" in kinds and "SkipSimplifiedLayerNormalization" in kinds
    assert "Softmax" not in kinds and "RelativePositionBias" not in kinds  # the bias runs on any provider


@pytest.mark.parametrize("arch", T5_ARCHITECTURES)
def test_fused_encoder_equals_pytorch(bundles, checkpoints, arch):
    """Padding, and distances past the last exact bucket and past max_distance (the fixtures have 8
    buckets: a different bucket count than the optimizer's own assumption of 32)."""
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoints[arch]).eval()
    session = ort.InferenceSession(str(bundles[arch] / "encoder_model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch, length in ((1, 1), (1, 9), (4, 37), (2, 200)):
        ids = rng.integers(3, model.config.vocab_size, (batch, length), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[-1, length // 2 + 1:] = 0
        got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            want = model.encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], want[real], atol=1e-4)


def _plain_encoder(checkpoint, out):
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), output=out, task="text2text-generation", device="cpu", do_validation=False,
                local_files_only=True)
    return out / "encoder_model.onnx"


def test_a_fusion_that_changes_outputs_is_not_kept(checkpoints, tmp_path, monkeypatch):
    """A wrong maximum distance changes the bias of far positions: the fused graph is checked against
    the plain one, so it is refused, nothing is written, and nothing is left in the working folder."""
    monkeypatch.chdir(tmp_path)
    plain = _plain_encoder(checkpoints["t5v11"], tmp_path / "optimum")
    config = AutoModelForSeq2SeqLM.from_pretrained(checkpoints["t5v11"]).config
    target = tmp_path / "fused.onnx"
    assert fuse_t5_encoder(plain, target, config)
    target.unlink()
    wrong = copy.deepcopy(config)
    wrong.relative_attention_max_distance = 16
    assert not fuse_t5_encoder(plain, target, wrong)
    assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == ["optimum"]


def test_graphs_with_external_weights_are_left_alone(checkpoints, tmp_path):
    plain = _plain_encoder(checkpoints["t5"], tmp_path / "optimum")
    model = onnx.load(str(plain))
    onnx.save(model, str(tmp_path / "external.onnx"), save_as_external_data=True, size_threshold=0)
    config = AutoModelForSeq2SeqLM.from_pretrained(checkpoints["t5"]).config
    assert not fuse_t5_encoder(tmp_path / "external.onnx", tmp_path / "fused.onnx", config)
    assert not (tmp_path / "fused.onnx").exists()


def test_heads_that_do_not_divide_the_width(tmp_path):
    """Flan-T5-small's shape: 6 heads of 64 on a width of 512 (the optimizer's own check of the
    heads it is given refuses it; lmcor lets it read each attention's heads from the graph)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=120, d_model=40, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=1,
                      num_heads=3, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "hf")
    plain = _plain_encoder(tmp_path / "hf", tmp_path / "optimum")
    assert fuse_t5_encoder(plain, tmp_path / "fused.onnx", config)
    session = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 120, (2, 30), dtype=np.int64)
    mask = np.ones_like(ids)
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        want = model.encoder(input_ids=torch.from_numpy(ids))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_graph_without_a_mask_input_is_checked_without_one(checkpoints, tmp_path):
    """An encoder exported with `input_ids` alone (ONNX Runtime's optimizer handles it) is fused, and
    checked without feeding a mask, not failed for lacking one."""
    import torch.onnx

    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoints["t5v11"]).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model.encoder

        def forward(self, input_ids):
            return self.encoder(input_ids=input_ids)[0]

    path = tmp_path / "ids_only.onnx"
    torch.onnx.export(Encoder().eval(), (torch.ones(2, 7, dtype=torch.long),), str(path), input_names=["input_ids"],
                      output_names=["last_hidden_state"], dynamic_axes={"input_ids": {0: "b", 1: "s"}},
                      opset_version=17, dynamo=False)
    target = tmp_path / "fused.onnx"
    assert fuse_t5_encoder(path, target, model.config)  # fused, and checked without a mask
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    ids = np.arange(3, 33, dtype=np.int64).reshape(2, 15)
    with torch.no_grad():
        want = model.encoder(input_ids=torch.from_numpy(ids))[0].numpy()
    np.testing.assert_allclose(session.run(None, {"input_ids": ids})[0], want, atol=1e-4)


def test_non_finite_outputs_are_refused(checkpoints, tmp_path, monkeypatch):
    """The check compares finite outputs only: a fused graph that gives NaN is not kept."""
    import lmcor.export.fusion as fusion

    plain = _plain_encoder(checkpoints["t5"], tmp_path / "optimum")
    config = AutoModelForSeq2SeqLM.from_pretrained(checkpoints["t5"]).config
    real = fusion._portable_position_bias

    def poisoned(graph, node, config):
        real(graph, node, config)
        table = next(t for t in graph.initializer if t.name.endswith("/portable/table"))
        table.CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(table).shape, np.nan,
                                                            np.float32), table.name))

    monkeypatch.setattr(fusion, "_portable_position_bias", poisoned)
    assert not fuse_t5_encoder(plain, tmp_path / "fused.onnx", config)
    assert not (tmp_path / "fused.onnx").exists()


def test_a_fused_bundle_converts_to_half(bundles, tmp_path):
    """`convert_bundle` (the GPU check's fp16/bf16 copies of the shipped default) reads the fused
    graph with onnx's own tools: its contrib operators' domain is declared."""
    from lmcor.export.half import convert_bundle
    from lmcor.runtime.corrector import Corrector
    from conftest import make_requests

    graph = onnx.load(str(bundles["t5v11"] / "encoder_model.onnx"), load_external_data=False)
    assert any(o.domain == "com.microsoft" for o in graph.opset_import)
    convert_bundle(bundles["t5v11"], tmp_path / "fp16", "fp16")
    requests = make_requests(6, seed=5)
    half = Corrector.load(tmp_path / "fp16").correct_batch(requests, fallback_below=0)
    full = Corrector.load(bundles["t5v11"]).correct_batch(requests, fallback_below=0)
    assert sum(a.text == b.text for a, b in zip(half, full)) >= 4
    # Replacing a folder never deletes what it is made from, and keeps nothing of the folder it replaced.
    import shutil

    from lmcor.runtime.errors import ExportError

    shutil.copytree(bundles["t5v11"], tmp_path / "all" / "fp32")
    (tmp_path / "all" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="the output folder contains the bundle"):
        convert_bundle(tmp_path / "all" / "fp32", tmp_path / "all", "fp16", overwrite=True)
    assert (tmp_path / "all" / "notes.txt").read_text() == "mine"
    (tmp_path / "fp16" / "stale.txt").write_text("old")
    convert_bundle(tmp_path / "all" / "fp32", tmp_path / "fp16", "bf16", overwrite=True)
    assert not (tmp_path / "fp16" / "stale.txt").exists()
