"""A missing, corrupt or foreign bundle is one clear error: BundleError in Python, exit 2 in the CLI."""

import json
import shutil

import pytest
from lmcor.runtime.bundle import FORMAT_VERSION, MANIFEST_NAME, load_manifest

from lmcor import BundleError, Corrector
from lmcor.cli import main


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(bundles["t5"], path)
    return path


def _edit_manifest(path, **changes):
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest.update(changes)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_manifest_describes_the_bundle(bundles):
    manifest = load_manifest(bundles["t5v11"])
    assert manifest.format_version == FORMAT_VERSION and manifest.kind == "corrector"
    assert manifest.architecture == "t5" and manifest.precision == "fp32" and manifest.opset >= 14
    assert manifest.decoder.head_dim == 12 and manifest.decoder.num_heads == 4  # d_kv != d_model / num_heads
    assert manifest.template.separator == " <extra_id_0> "
    assert set(manifest.sha256) == {p.name for p in bundles["t5v11"].iterdir()} - {MANIFEST_NAME}
    assert manifest.validation["greedy_tokens_identical"] is True and manifest.validation["greedy_token_agreement"] == 1.0
    assert 0 <= manifest.validation["max_abs_logit_diff"] <= manifest.validation["tolerance"]
    assert load_manifest(bundles["bart"]).special_tokens.forced_eos == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: shutil.rmtree(p), "no such bundle directory"),
        (lambda p: (p / MANIFEST_NAME).unlink(), "not an lmcor bundle"),
        (lambda p: (p / MANIFEST_NAME).write_text("{not json"), "corrupt manifest"),
        (lambda p: _edit_manifest(p, format_version=FORMAT_VERSION + 1), "unknown bundle format version"),
        (lambda p: _edit_manifest(p, kind="teapot"), "unknown bundle kind"),
        (lambda p: (p / "tokenizer.json").write_text("{}"), "checksum mismatch"),
        (lambda p: (p / "encoder_model.onnx").unlink(), "encoder file 'encoder_model.onnx' is missing"),
    ],
    ids=["no-dir", "no-manifest", "corrupt-manifest", "future-version", "wrong-kind", "checksum", "missing-file"],
)
def test_broken_bundles_fail_clearly(bundle_copy, tmp_path, capsys, damage, message):
    damage(bundle_copy)
    with pytest.raises(BundleError, match=message):
        Corrector.load(bundle_copy)
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"source": "a", "candidates": ["b"]}\n')
    assert main(["correct", "--model", str(bundle_copy), str(requests)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmcor: error: ") and message in err[0]


def test_corrupt_onnx_file_is_a_bundle_error(bundle_copy):
    (bundle_copy / load_manifest(bundle_copy).files["decoder"]).write_bytes(b"garbage")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        Corrector.load(bundle_copy, verify=False)


def test_sessions_stop_spinning_after_each_run(bundles):
    """The corrector's sessions run one after another: a pool left spinning would take the next one's cores."""
    sessions = Corrector.load(bundles["t5"], threads=2).sessions
    for session in (sessions.encoder, sessions.decoder, sessions.cross):
        options = session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert options.intra_op_num_threads == 2


def test_the_shared_embedding_is_stored_once(bundles):
    """Encoder and decoder point at one copy of T5's shared embedding (parity tests check the numbers)."""
    import onnx

    from lmcor.export.shared_weights import WEIGHTS_FILE

    root = bundles["t5"]
    manifest = load_manifest(root)
    assert WEIGHTS_FILE in manifest.sha256
    for role in ("encoder", "decoder"):
        graph = onnx.load(str(root / manifest.files[role]), load_external_data=False).graph
        locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {WEIGHTS_FILE}
