"""Export edge cases: T5 decoders deeper or shallower than their encoders (the T5-efficient family),
BART's learned positions, and exports that fail, which must fail in one line and leave nothing behind:
corrupt files, folders that overlap, flags that do not apply, an interrupt."""

import json
import logging
import os
import shutil
import signal

import pytest
import torch
from conftest import _train_tokenizer, build_checkpoint, make_requests
from lmcor.export import decoder as ragged
from lmcor.export import export_corrector
from lmcor.export.causal_lm import export_causal_lm
from lmcor.runtime.errors import ExportError
from lmcor.runtime.template import render
from test_parity import _reference
from transformers import (
    T5Config,
    T5ForConditionalGeneration,
)

from lmcor import Corrector, InputError
from lmcor.cli import main

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
    assert manifest.validation["samples"] == 6  # shorter forms of the samples that do not fit 24 positions
    corrector = Corrector.load(tmp_path / "bundle")
    for drafts in (True, False):
        forced = corrector.correct_batch([("she go", ["she goes"]), ("a b", ["a b c"])], min_new_tokens=24,
                                         drafts=drafts, fallback_below=0)
        assert [len(c.token_ids) for c in forced] == [23, 23]  # the 24th is BART's forced EOS
    with pytest.raises(ExportError, match="--max-output-tokens 25: the model has 24 positions"):
        export_corrector(checkpoint, tmp_path / "refused", max_output_tokens=25)
    # Fewer positions than optimum's sample inputs take (16 tokens, a sample cache of 18): traced on shorter ones.
    manifest = export_corrector(build_checkpoint("bart", tmp_path / "bart-16", positions=16), tmp_path / "bundle-16")
    assert manifest.max_output_tokens == 16 and manifest.validation["greedy_tokens_identical"]


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
    assert not exports.exists() or not any(exports.iterdir()), "a failed export left files behind"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, corrupt, says", [
    ("model.safetensors", _truncate, "cannot be read (Error while deserializing header"),
    ("model.safetensors", lambda p: p.write_bytes(b"not a safetensors file"), "cannot be read ("),
    ("tokenizer.json", lambda p: p.write_text("garbage{"), "cannot be read ("),
    ("config.json", lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    ("generation_config.json", lambda p: p.write_text("{"), "not valid JSON ("),
    ("config.json", lambda p: p.write_text(p.read_text().replace('"model_type": "t5"', '"model_kind": "t5"')),
     'no "model_type" (save_pretrained writes one): add the model\'s type (a corrector\'s is one of t5, mt5, '),
], ids=["truncated-weights", "garbage-weights", "garbage-tokenizer", "config-list", "generation-config-json",
        "no-model-type"])
def test_a_corrupt_file_is_named(t5_checkpoints, tmp_path, name, corrupt, says):
    checkpoint = shutil.copytree(t5_checkpoints[2, 3], tmp_path / "corrupt")
    corrupt(checkpoint / name)
    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(ExportError) as error:
        export_corrector(checkpoint, exports / "bundle")
    assert str(error.value).startswith(f"{checkpoint / name}: {says}")
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


def test_a_librarys_long_error_line_is_cut(tmp_path):
    from lmcor.export.checkpoint import stage

    with pytest.raises(ExportError) as error:
        with stage(tmp_path, "loading the checkpoint"):
            raise ValueError("should be one of: " + ", ".join(f"type{n}" for n in range(500)))
    said = str(error.value)
    assert said.startswith(f"{tmp_path}: loading the checkpoint failed: ValueError: should be one of: type0, ")
    assert said.endswith(" ...") and len(said) < len(str(tmp_path)) + 500


def test_failure_mid_export_leaves_nothing(t5_checkpoints, tmp_path, monkeypatch, caplog):
    def broken_exporter(*args, **kwargs):
        raise RuntimeError("tracing failed\n  a long multi-line report from torch.onnx")

    monkeypatch.setattr(ragged, "export_step_decoder", broken_exporter)
    caplog.set_level(logging.DEBUG, logger="lmcor")
    exports = tmp_path / "exports"
    with pytest.raises(ExportError, match="building the step graph failed: RuntimeError: tracing failed$") as error:
        export_corrector(t5_checkpoints[2, 3], exports / "bundle")
    _assert_one_line_and_nothing_written(error.value, exports)  # the staging folder is gone too
    assert not exports.exists()  # and so is the folder it made for the bundle
    assert any(r.exc_info for r in caplog.records), "the full traceback should be in the debug log"


def test_a_forced_export_replaces_a_links_target_and_never_the_working_directory(t5_checkpoints, tmp_path, capsys,
                                                                                   monkeypatch):
    """`prod -> bundles/v3`: the bundle at v3 is replaced (the link was, and v3 kept serving the old one);
    `lmcor export CK . --force` is refused (the shell was left in a removed folder)."""
    real = tmp_path / "bundles" / "v3"
    real.mkdir(parents=True)
    (real / "lmcor.json").write_text("{}")  # an earlier bundle's
    (real / "old.txt").write_text("a file of that bundle")
    link = tmp_path / "prod"
    link.symlink_to(real)
    assert main(["export", str(t5_checkpoints[2, 3]), str(link), "--force"]) == 0
    assert link.is_symlink() and (real / "lmcor.json").is_file() and not (real / "old.txt").exists()
    capsys.readouterr()
    monkeypatch.chdir(real)
    assert main(["export", str(t5_checkpoints[2, 3]), ".", "--force"]) == 2
    err = capsys.readouterr().err
    assert ".: the output folder is the working directory" in err and (real / "lmcor.json").is_file()


def test_force_replaces_a_bundle_and_never_a_folder_of_other_files(t5_checkpoints, tmp_path, capsys):
    """`--force` into a folder of someone's files (a slip of the path) deleted them all; it replaces
    an earlier bundle only. A folder that fills while the export runs is not replaced either."""
    from lmcor.export.checkpoint import replace_folder
    from lmcor.runtime.errors import ExportError

    out = tmp_path / "documents"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(t5_checkpoints[2, 3]), str(out), "--force"]) == 2
    assert "holds files but no lmcor.json: not a bundle" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "photos").is_dir()
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "lmcor.json").write_text("{}")
    late = tmp_path / "late"  # absent when the export began, written to since
    late.mkdir()
    (late / "important.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        replace_folder(late, staged, tmp_path / "old", overwrite=False)
    assert (late / "important.txt").is_file() and (staged / "lmcor.json").is_file()
    notes = tmp_path / "notes.txt"  # a file where the bundle would go: not renamed away into the staging folder
    notes.write_text("mine")
    for force in (False, True):
        with pytest.raises(ExportError, match="a file, not a folder"):
            replace_folder(notes, staged, tmp_path / "old", overwrite=force)
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-checkpoint", "out-contains-checkpoint"])
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_the_output_folder_never_holds_the_checkpoint(t5_checkpoints, tmp_path, capsys, inside, force):
    parent = tmp_path / "parent"
    checkpoint = shutil.copytree(t5_checkpoints[2, 3], parent / "ckpt")
    (parent / "other.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = parent if inside else checkpoint
    assert main(["export", str(checkpoint), str(out), *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}: the output folder" in err[0] and f"the checkpoint {checkpoint}" in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_validation_decodes_within_a_small_output_limit(t5_checkpoints, gpt2_checkpoint, tmp_path):
    manifest = export_corrector(t5_checkpoints[2, 3], tmp_path / "corrector", max_output_tokens=1)
    assert manifest.max_output_tokens == 1 and manifest.validation["greedy_tokens_identical"]
    manifest = export_causal_lm(gpt2_checkpoint, tmp_path / "lm", max_output_tokens=1)
    assert manifest.max_output_tokens == 1 and manifest.validation["greedy_tokens_identical"]
    # Few input positions: the sample prompts are cut to fit them with their answers.
    manifest = export_causal_lm(gpt2_checkpoint, tmp_path / "short", max_input_tokens=6)
    assert manifest.max_input_tokens == 6 and manifest.validation["greedy_tokens_identical"]


def test_a_checkpoint_without_a_classification_head_is_refused_as_a_classifier(gpt2_checkpoint, tmp_path, capsys):
    assert main(["export", "--kind", "classifier", str(gpt2_checkpoint), str(tmp_path / "cls")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lmcor: error: {gpt2_checkpoint}: no classification head in this checkpoint (score.")
    assert not (tmp_path / "cls").exists()


def test_opset_below_14_is_refused_and_exporter_failures_are_one_line(t5_checkpoints, tmp_path, capfd):
    assert main(["export", str(t5_checkpoints[2, 3]), str(tmp_path / "out"), "--opset", "13"]) == 2
    assert "--opset must be from 14 to" in capfd.readouterr().err
    exports = tmp_path / "exports"
    with pytest.raises(ExportError, match=r"ONNX export failed: \w+: .*opset version 13 is not supported") as error:
        export_corrector(t5_checkpoints[2, 3], exports / "bundle", opset=13)  # the API does not check the range
    _assert_one_line_and_nothing_written(error.value, exports)
    printed = capfd.readouterr()
    assert "Torch IR graph" not in printed.out + printed.err  # torch prints it from C++, past sys.stdout


@pytest.mark.parametrize("args, says", [
    (["--kind", "causal-lm", "--template", "{source}"], "--template does not apply to --kind causal-lm"),
    (["--kind", "classifier", "--separator", " "], "--separator does not apply to --kind classifier"),
    (["--kind", "causal-lm", "--packed-encoder"], "--packed-encoder does not apply to --kind causal-lm"),
    (["--precision", "int8", "--packed-encoder"], "the packed encoder's weights are fp32: export it with --precision fp32"),
    (["--kind", "classifier", "--max-output-tokens", "8"], "--max-output-tokens does not apply to --kind classifier"),
    (["--kind", "causal-lm", "--atol", "0.1"], "--atol: a causal LM's fp32 validation requires identical greedy tokens"),
])
def test_a_flag_that_does_not_apply_is_refused(tmp_path, capsys, args, says):
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_an_activation_the_packed_encoder_lacks_is_refused_before_the_export(checkpoints, tmp_path, monkeypatch):
    """Said at once, as lmcor's own error (a ValueError came after the whole export and validation)."""
    from lmcor.export import seq2seq

    checkpoint = tmp_path / "tanh"
    shutil.copytree(checkpoints["t5v11"], checkpoint)  # gated: wi_0, wi_1
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-gelu_pytorch_tanh",
                                                        "dense_act_fn": "gelu_pytorch_tanh"}))
    monkeypatch.setattr(seq2seq, "staged_export", None)  # reached only by an export that went on
    exports = tmp_path / "exports"
    with pytest.raises(ExportError, match=r"the packed encoder has no 'gelu_pytorch_tanh' activation \(it has relu, "):
        export_corrector(checkpoint, exports / "bundle", packed_encoder=True)
    assert not exports.exists()


def test_atol_sets_the_half_precision_tolerance(t5_checkpoints, tmp_path):
    manifest = export_corrector(t5_checkpoints[2, 3], tmp_path / "fp16", precision="fp16", atol=7.0)
    assert 7.0 < manifest.validation["tolerance"] < 8.0  # atol + rtol x max |logit| (default atol: 5e-2)


def test_a_causal_lm_exported_as_a_corrector_hints_at_its_kind(gpt2_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="model type 'gpt2' is not supported as a corrector .*; export it with "
                       "--kind causal-lm$"):
        export_corrector(gpt2_checkpoint, tmp_path / "bundle")


def test_a_bart_whose_decoder_has_other_heads_than_its_encoder_is_refused_by_name(tmp_path, capsys):
    """optimum's exporter shapes BART's cross-attention cache by the encoder's heads, and fails to trace
    one whose decoder has others (PyTorch runs it)."""
    checkpoint = build_checkpoint("bart", tmp_path / "bart", positions=24)
    config = checkpoint / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "decoder_attention_heads": 2}))
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 2
    assert "its decoder has 2 attention heads and its encoder 4; optimum's exporter" in capsys.readouterr().err


def test_a_checkpoint_of_another_kind_is_refused_by_its_config(t5_checkpoints, tmp_path, capsys):
    """Before its weights load: a seq2seq type lmcor does not decode, a T5 as a classifier."""
    checkpoint = shutil.copytree(t5_checkpoints[2, 3], tmp_path / "longt5")
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace('"model_type": "t5"', '"model_type": "longt5"'))
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"lmcor: error: {checkpoint}: model type 'longt5' is not supported as a corrector "
                           "(supported: t5, mt5, bart, mbart)")
    assert main(["export", "--kind", "classifier", str(t5_checkpoints[2, 3]), str(tmp_path / "out")]) == 2
    assert "a t5 checkpoint cannot be exported as a classifier" in capsys.readouterr().err
    # the original T5's head is T5WithLMHeadModel: still a corrector, not a causal LM
    original = shutil.copytree(t5_checkpoints[2, 3], tmp_path / "t5-original")
    config = original / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["T5WithLMHeadModel"]}))
    for kind in ("classifier", "causal-lm"):
        assert main(["export", "--kind", kind, str(original), str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.rstrip().endswith("; export it with --kind corrector"), kind
    # a BART that classifies is a classifier's
    classifying = shutil.copytree(original, tmp_path / "bart-classifier")
    config = classifying / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "bart",
                                  "architectures": ["BartForSequenceClassification"]}))
    for kind in ("causal-lm", "corrector"):  # a corrector's auto class loads it too, its LM head untrained
        assert main(["export", "--kind", kind, str(classifying), str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.rstrip().endswith("; export it with --kind classifier"), kind


def test_bart_whose_output_is_one_token_validates(tmp_path):
    """A forced BOS then EOS: validation reads the first step's logits before the next call reuses
    their buffer."""
    from transformers import BartForConditionalGeneration

    checkpoint = build_checkpoint("bart", tmp_path / "bart")
    model = BartForConditionalGeneration.from_pretrained(checkpoint)
    model.config.forced_bos_token_id = model.generation_config.forced_bos_token_id = 0
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = 50.0
    model.save_pretrained(checkpoint)
    manifest = export_corrector(checkpoint, tmp_path / "bundle")
    assert manifest.validation["max_abs_logit_diff"] < 1e-3


def test_bart_without_a_decoder_start_starts_from_bos_and_beam_settings_not_applied_are_said(tmp_path, caplog):
    """As `generate` does, a checkpoint with no decoder start begins with BOS; the beam settings of its
    generation config that lmcor does not apply are named at export."""
    from transformers import BartForConditionalGeneration

    checkpoint = build_checkpoint("bart", tmp_path / "bart")
    model = BartForConditionalGeneration.from_pretrained(checkpoint)
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = None
    model.generation_config.update(num_beams=4, length_penalty=2.0, early_stopping=True)
    model.save_pretrained(checkpoint)
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        manifest = export_corrector(checkpoint, tmp_path / "bundle")
    assert manifest.special_tokens.decoder_start == model.config.bos_token_id
    assert manifest.validation["greedy_tokens_identical"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"generation_config.{name}=" in said for name in ("num_beams", "length_penalty", "early_stopping"))


def test_the_start_token_is_generates_and_generation_settings_not_applied_are_named(tmp_path, caplog):
    """A generation_config.json without a decoder start overrides config.json's: `generate` starts from
    its BOS, and so does the bundle; every setting of it that changes greedy tokens and that lmcor does
    not apply is named, not only those of a fixed list."""
    from transformers import BartForConditionalGeneration

    checkpoint = build_checkpoint("bart", tmp_path / "bart")
    model = BartForConditionalGeneration.from_pretrained(checkpoint)
    torch.manual_seed(3)
    with torch.no_grad():  # outputs that depend on their first token
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    model.config.decoder_start_token_id = 2
    model.generation_config.decoder_start_token_id = None
    model.save_pretrained(checkpoint)
    saved = json.loads((checkpoint / "generation_config.json").read_text())
    assert "decoder_start_token_id" not in saved and saved["bos_token_id"] == 0
    saved.update(sequence_bias=[[[5], 1.0]], exponential_decay_length_penalty=[3, 3.0])
    (checkpoint / "generation_config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        manifest = export_corrector(checkpoint, tmp_path / "bundle")
    assert manifest.special_tokens.decoder_start == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"generation_config.{name}=" in said for name in ("sequence_bias", "exponential_decay_length_penalty"))
    assert "config.json's decoder_start_token_id=2 is not the one generate starts from" in said
    model = BartForConditionalGeneration.from_pretrained(checkpoint).eval()
    model.generation_config.update(sequence_bias=None, exponential_decay_length_penalty=None)  # those lmcor says it skips
    corrector = Corrector.load(tmp_path / "bundle")
    got = corrector.correct_batch(INPUTS, max_new_tokens=12)
    for request, ours in zip(INPUTS, got):
        text = render(corrector.manifest.template, request["source"], request["candidates"]).text
        ids = torch.tensor([corrector.tokenizer.encode(text).ids])
        with torch.no_grad():  # the checkpoint's own generation config: its start token
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)[0].tolist()
        reference = tokens[1:][: tokens[1:].index(2)] if 2 in tokens[1:] else tokens[1:]
        assert tokens[0] == 0 and ours.token_ids == reference


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_export_says_nothing_was_written(t5_checkpoints, tmp_path, monkeypatch, capsys, signum, code):
    """Ctrl-C or SIGTERM (a `timeout`, a container stopped) mid-export: the earlier bundle stays and
    no staging folder is left (SIGTERM left one, a hidden copy of every graph)."""
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(ragged, "export_step_decoder", interrupted)
    out = tmp_path / "exports" / "bundle"
    out.mkdir(parents=True)
    (out / "lmcor.json").write_text("{}")  # an earlier bundle's
    assert main(["export", str(t5_checkpoints[2, 3]), str(out), "--force"]) == code
    said = f"lmcor: export interrupted; {out} was not written (left as it was)"
    assert capsys.readouterr().err.strip().splitlines() == [said]
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["bundle"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["lmcor.json"]


def test_an_export_into_the_current_folder_and_an_output_limit_past_any_answer(t5_checkpoints, tmp_path,
                                                                               monkeypatch, capsys):
    """"." is the working directory, which replacing it would remove from under the shell: refused,
    nothing written; a limit of a billion output or input tokens (T5 has no position limit) is refused
    before anything runs."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["export", str(t5_checkpoints[2, 3]), "x", "--max-output-tokens", "1000000000"]) == 2
    assert "--max-output-tokens 1000000000: at most 32768" in capsys.readouterr().err
    assert main(["export", str(t5_checkpoints[2, 3]), "x", "--max-input-tokens", "1000000000"]) == 2
    assert "--max-input-tokens 1000000000: at most 4194304" in capsys.readouterr().err  # (a bundle's bound)
    assert main(["export", str(t5_checkpoints[2, 3]), "."]) == 2
    assert ".: the output folder is the working directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not any(here.iterdir())


def _t5(path, tokenizer, **config):
    torch.manual_seed(1)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                        **config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_checkpoint_missing_weights_is_refused_not_exported_with_random_ones(tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = _t5(tmp_path / "ckpt", _train_tokenizer("t5"), feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    weights = load_file(checkpoint / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, checkpoint / "model.safetensors", {"format": "pt"})
    with pytest.raises(ExportError, match=r"lacks weights of this model \(lm_head.weight would start at random\)"):
        export_corrector(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokens_past_the_models_vocabulary_fail_their_request_alone(tmp_path, caplog):
    tokenizer = _train_tokenizer("t5")
    checkpoint = _t5(tmp_path / "ckpt", tokenizer)
    tokenizer.add_tokens(["<sep>"], special_tokens=True)  # the model is not resized: a common slip
    tokenizer.save_pretrained(checkpoint)
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        export_corrector(checkpoint, tmp_path / "out")
    assert "a text holding one of the others is refused" in caplog.text
    corrector = Corrector.load(tmp_path / "out")
    bad, good = corrector.correct_batch([("she go <sep> home", ["She goes home."]), INPUTS[0]], errors="return",
                                        max_new_tokens=4)
    assert "the token '<sep>'" in str(bad) and "vocabulary of" in str(bad) and good.text is not None
    future = corrector.engine.submit(("she go <sep> home", ["She goes home."]))  # the online path alike
    with pytest.raises(InputError, match="the token '<sep>'"):
        future.result(timeout=60)


def test_large_weights_whose_fp32_rounding_passes_the_tolerance_still_validate(tmp_path):
    checkpoint = _t5(tmp_path / "ckpt", _train_tokenizer("t5"), initializer_factor=3.0)
    manifest = export_corrector(checkpoint, tmp_path / "out")  # was refused: the bundle is closer to float64 than PyTorch
    assert manifest.validation["greedy_tokens_identical"]
    assert manifest.validation["max_abs_logit_diff"] <= manifest.validation["tolerance"]


def test_a_decoder_only_classifier_without_a_configured_pad_uses_its_tokenizers(tmp_path):
    from lmcor import Classifier
    from lmcor.export.classifier import export_classifier
    from test_generator import _tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = _tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               num_labels=2, pad_token_id=None, bos_token_id=None,
                                               eos_token_id=tokenizer.eos_token_id, initializer_range=0.3,
                                               max_position_embeddings=64)).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    manifest = export_classifier(tmp_path / "ckpt", tmp_path / "out")  # was refused: batched != alone
    assert manifest.pad_token == tokenizer.eos_token_id
    classifier = Classifier.load(tmp_path / "out")
    texts = ["a short one", "a much longer text than the other one here"]
    batched = classifier.classify_batch(texts)
    alone = [classifier.classify(t) for t in texts]
    assert all(abs(a.probabilities - b.probabilities).max() < 1e-4 for a, b in zip(batched, alone))


@pytest.mark.parametrize("pad", [-1, "vocab"])
def test_a_causal_lm_whose_pad_id_is_no_token_pads_with_eos(tmp_path, pad):
    """Early LLaMA conversions say -1; some configs name an id past the embeddings."""
    from test_generator import _tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    if pad == -1:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id))
    else:  # GPT-2's embeddings keep no padding index, so transformers loads it
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    for name in ("config.json", "generation_config.json"):  # written by hand: transformers refuses to save -1
        path = tmp_path / "ckpt" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token_id": len(tokenizer) if pad == "vocab"
                                    else pad}))
    manifest = export_causal_lm(tmp_path / "ckpt", tmp_path / "out")
    assert manifest.special_tokens.pad == tokenizer.eos_token_id


def test_positions_are_read_where_each_family_keeps_them():
    """MPT keeps them in max_seq_len; a LongRoPE model changes its rotary factors past
    original_max_position_embeddings, so its bundle keeps to those (its traced graph has the first ones)."""
    from lmcor.export.checkpoint import input_limit, model_positions
    from transformers import LlamaConfig, MptConfig, Phi3Config

    assert model_positions(MptConfig(max_seq_len=128)) == 128
    longrope = Phi3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                          vocab_size=100, max_position_embeddings=128, original_max_position_embeddings=32,
                          rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    assert model_positions(longrope) == 32
    with pytest.raises(ExportError, match="keeps to the model's first 32 positions .past original_max_position_embeddings"):
        input_limit(longrope, None, 64)
    assert model_positions(LlamaConfig(max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 2.0})) == 64
    # t5-small's and Flan-T5's configs still carry a legacy "n_positions": 512; their positions are relative
    from transformers import T5Config

    assert model_positions(T5Config(n_positions=512)) is None


def test_key_value_heads_are_read_where_each_family_keeps_them():
    from lmcor.export.causal_lm import _shape
    from transformers import FalconConfig

    falcon = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}
    assert _shape(FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2)).num_heads == 2  # grouped
    assert _shape(FalconConfig(**falcon, multi_query=True)).num_heads == 1  # Falcon-7B's one key/value head
    assert _shape(FalconConfig(**falcon, multi_query=False)).num_heads == 4


def test_a_forced_token_given_as_a_list_of_one_is_that_token(tmp_path):
    """transformers takes forced_eos_token_id as an int or a list; lmcor forces one token."""
    checkpoint = build_checkpoint("bart", tmp_path / "bart")
    settings = checkpoint / "generation_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "forced_eos_token_id": [2]}))
    assert export_corrector(checkpoint, tmp_path / "one").special_tokens.forced_eos == 2
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "forced_eos_token_id": [2, 3]}))
    with pytest.raises(ExportError, match=r"generation_config.json gives forced_eos_token_id \[2, 3\]; lmcor forces one"):
        export_corrector(checkpoint, tmp_path / "two")
    assert not (tmp_path / "two").exists()


def test_a_graph_whose_weights_are_files_of_their_own_gets_one_data_file(tmp_path):
    """Over 2 GB, the TorchScript exporter writes each weight to a file named after it; a bundle
    holds a graph and `<graph>.data`."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=(32, 32)).astype(np.float32) for name in ("layer.0.weight", "layer.1.weight")}
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "layer.0.weight"], ["h"]),
                               helper.make_node("MatMul", ["h", "layer.1.weight"], ["y"])], "two",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    path = tmp_path / "decoder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "layer.0.weight", "layer.1.weight"]
    ragged.one_data_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    x = rng.normal(size=(1, 32)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weights["layer.0.weight"] @ weights["layer.1.weight"], rtol=1e-5)
