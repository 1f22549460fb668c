"""Export edge cases: T5 decoders deeper or shallower than their encoders (the T5-efficient family),
BART's learned positions, and exports that fail, which must fail in one line and leave nothing behind."""

import logging
import shutil

import pytest
import torch
from conftest import _train_tokenizer, build_checkpoint, make_requests
from test_parity import _reference
from lmcor.export import decoder as ragged
from lmcor.export import export_corrector
from lmcor.runtime.errors import ExportError
from transformers import T5Config, T5ForConditionalGeneration

from lmcor import Corrector

INPUTS = make_requests(12, seed=11)
DEPTHS = [(2, 3), (3, 1)]  # (encoder, decoder)


@pytest.fixture(scope="module")
def t5_checkpoints(tmp_path_factory) -> dict:
    """Tiny random T5s whose decoder depth differs from the encoder's, keyed by (encoder, decoder)."""
    tokenizer = _train_tokenizer("t5")
    root = tmp_path_factory.mktemp("t5_depths")
    out = {}
    for encoder, decoder in DEPTHS:
        torch.manual_seed(0)
        config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=encoder,
                          num_decoder_layers=decoder, num_heads=4, relative_attention_num_buckets=8,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(config)
        with torch.no_grad():
            model.lm_head.weight[config.eos_token_id] *= 15.0  # some outputs end early, some run long
        path = root / f"t5_{encoder}_{decoder}"
        model.eval().save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[encoder, decoder] = path
    return out


def test_bart_outputs_end_within_the_decoders_positions(tmp_path):
    # A decoder fed past its last learned position fails in ONNX Runtime: the bundle's output limit
    # is the model's positions unless asked for fewer, and more is refused.
    checkpoint = build_checkpoint("bart", tmp_path / "bart", positions=24)
    manifest = export_corrector(checkpoint, tmp_path / "bundle")
    assert manifest.max_output_tokens == 24
    corrector = Corrector.load(tmp_path / "bundle")
    for drafts in (True, False):
        forced = corrector.correct_batch([("she go", ["she goes"]), ("a b", ["a b c"])], min_new_tokens=24,
                                         drafts=drafts, fallback_below=0)
        assert [len(c.token_ids) for c in forced] == [23, 23]  # the 24th is BART's forced EOS
    with pytest.raises(ExportError, match="--max-output-tokens 25: the model has 24 positions"):
        export_corrector(checkpoint, tmp_path / "refused", max_output_tokens=25)


@pytest.mark.parametrize("depths", DEPTHS, ids=lambda d: f"encoder{d[0]}-decoder{d[1]}")
def test_decoder_depth_differs_from_encoder(t5_checkpoints, tmp_path, depths):
    out = tmp_path / "bundle"
    manifest = export_corrector(t5_checkpoints[depths], out)
    assert manifest.decoder.num_layers == depths[1]
    assert manifest.validation["greedy_tokens_identical"]
    corrector = Corrector.load(out)
    got = corrector.correct_batch(INPUTS, max_new_tokens=20, batch_size=8)  # ragged rows, drafts on
    assert [c.token_ids for c in got] == _reference(t5_checkpoints[depths], corrector, INPUTS, num_beams=1, max_new_tokens=20,
                                                                     use_cache=False)


def test_int8_export_of_deeper_decoder(t5_checkpoints, tmp_path):
    manifest = export_corrector(t5_checkpoints[2, 3], tmp_path / "bundle", precision="int8")
    assert manifest.precision == "int8"
    assert manifest.validation["tolerance"] is None and manifest.validation["greedy_token_agreement"] > 0


def _assert_one_line_and_nothing_written(error: ExportError, exports) -> None:
    assert "\n" not in str(error)
    assert not any(exports.iterdir()), "a failed export left files behind"


def test_corrupted_weights_fail_in_one_line(t5_checkpoints, tmp_path):
    checkpoint = shutil.copytree(t5_checkpoints[2, 3], tmp_path / "corrupt")
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(ExportError, match="loading the checkpoint failed") as error:
        export_corrector(checkpoint, exports / "bundle")
    _assert_one_line_and_nothing_written(error.value, exports)


def test_unknown_architecture_fails_in_one_line(t5_checkpoints, tmp_path):
    checkpoint = shutil.copytree(t5_checkpoints[2, 3], tmp_path / "unknown")
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace('"model_type": "t5"', '"model_type": "no-such-model"'))
    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(ExportError, match=f"^{checkpoint}: loading the checkpoint failed: ") as error:
        export_corrector(checkpoint, exports / "bundle")
    _assert_one_line_and_nothing_written(error.value, exports)


def test_failure_mid_export_leaves_nothing(t5_checkpoints, tmp_path, monkeypatch, caplog):
    def broken_exporter(*args, **kwargs):
        raise RuntimeError("tracing failed\n  a long multi-line report from torch.onnx")

    monkeypatch.setattr(ragged, "export_step_decoder", broken_exporter)
    caplog.set_level(logging.DEBUG, logger="lmcor")
    exports = tmp_path / "exports"
    with pytest.raises(ExportError, match="building the step graph failed: RuntimeError: tracing failed$") as error:
        export_corrector(t5_checkpoints[2, 3], exports / "bundle")
    _assert_one_line_and_nothing_written(error.value, exports)  # the staging folder is gone too
    assert any(r.exc_info for r in caplog.records), "the full traceback should be in the debug log"
