"""A tampered bundle is refused at load with one BundleError naming the bundle and the field: its
files stay inside its folder, every file it opens has a checksum, and every manifest field is
checked against its type, its range, the tokenizer and the graphs, so nothing fails later."""

import json
import logging
import shutil
from collections.abc import Callable

import pytest
from lmcor.runtime import sessions
from lmcor.runtime.bundle import MANIFEST_NAME, load_manifest, sha256_of, shipped_bundle

from lmcor import BundleError, Classifier, Corrector, Generator
from lmcor.cli import main

Change = Callable[[dict, object], None]  # (manifest, bundle path) -> None, edits in place
REQUESTS = [("she go home", ["She goes home.", "She go home."]), ("a cat sat", ["A cat sat."])]


def _edit(path, change: Change) -> None:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    change(manifest, path)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def _reseal(path) -> None:
    """Record the files' current checksums: the defect under test is the only one left."""
    _edit(path, lambda m, p: m["sha256"].update({name: sha256_of(p / name) for name in m["sha256"]}))


def _set(section: str | None, **values) -> Change:
    return lambda m, p: (m[section] if section else m).update(values)


def _drop(section: str | None, key: str) -> Change:
    return lambda m, p: (m[section] if section else m).pop(key)


def _add(section: str, field: str, delta: int) -> Change:
    return lambda m, p: m[section].update({field: m[section][field] + delta})


def _outside_file(m: dict, p, role: str, name: str) -> None:
    """Point `role` at a copy of its file outside the bundle, through `name`, without a checksum."""
    outside = p.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(p / m["files"][role], outside / m["files"][role])
    if name == "link":
        (p / "link").symlink_to(outside / m["files"][role])
    m["sha256"].pop(m["files"][role])
    m["files"][role] = name if name != "absolute" else str(outside / m["files"][role])


def _empty_vocabulary(m: dict, p) -> None:
    tokenizer = json.loads((p / "tokenizer.json").read_text())
    tokenizer["model"].update(vocab=[], unk_id=None)
    tokenizer["added_tokens"] = []
    (p / "tokenizer.json").write_text(json.dumps(tokenizer))
    m["sha256"]["tokenizer.json"] = sha256_of(p / "tokenizer.json")


def _beyond_tokenizer(m: dict, p) -> None:
    """An eos the decoder could write but the tokenizer cannot read."""
    m["decoder"]["vocab_size"] += 10
    m["special_tokens"]["eos"] = m["decoder"]["vocab_size"] - 1


def _bigger_vocabulary(m: dict, p) -> None:
    """Another model's tokenizer: more tokens than the model has embeddings."""
    tokenizer = json.loads((p / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]  # T5's Unigram: [piece, score] pairs
    vocab.extend([f"extra{i}", -30.0] for i in range(m["decoder"]["vocab_size"] + 10 - len(vocab)))
    (p / "tokenizer.json").write_text(json.dumps(tokenizer))
    m["sha256"]["tokenizer.json"] = sha256_of(p / "tokenizer.json")


def _other_decoder_graph(m: dict, p) -> None:
    m["decoder_graph"] = "merged" if m.get("decoder_graph") == "ragged" else "ragged"


CORRECTOR_DEFECTS = {
    # paths
    "absolute-path": (lambda m, p: _outside_file(m, p, "encoder", "absolute"), "files.encoder"),
    "parent-path": (lambda m, p: _outside_file(m, p, "encoder", "../outside/encoder_model.onnx"), "files.encoder"),
    "symlink-outside": (lambda m, p: _outside_file(m, p, "tokenizer", "link"), "files.tokenizer"),
    "etc-passwd": (lambda m, p: m["files"].update(tokenizer="/etc/passwd"), "files.tokenizer"),
    "backslash-path": (_set("files", encoder="..\\encoder_model.onnx"), "files.encoder"),
    "dot-path": (_set("files", encoder="./encoder_model.onnx"), "files.encoder"),
    "empty-path": (_set("files", encoder=""), "files.encoder"),
    "path-not-string": (_set("files", encoder=7), "files.encoder"),
    "files-not-dict": (_set(None, files=["encoder_model.onnx"]), "files"),
    "sha256-key-outside": (lambda m, p: m["sha256"].update({"../lmcor.json": "0" * 64}), "sha256"),
    "sha256-not-hex": (lambda m, p: m["sha256"].update({"tokenizer.json": "abc"}), "sha256.tokenizer.json"),
    "sha256-entry-removed": (lambda m, p: m["sha256"].pop("encoder_model.onnx"), "sha256"),
    "sha256-table-removed": (_drop(None, "sha256"), "sha256"),
    "sha256-of-external-weights-removed": (lambda m, p: m["sha256"].pop("shared_weights.bin"), "shared_weights.bin"),
    # roles
    "missing-decoder": (_drop("files", "decoder"), "files.decoder"),
    "missing-tokenizer": (_drop("files", "tokenizer"), "files.tokenizer"),
    "missing-cross": (_drop("files", "cross"), "files.cross"),
    # scalar fields
    "kind-missing": (_drop(None, "kind"), "kind"),
    "format-version-true": (_set(None, format_version=True), "format_version"),
    "format-version-string": (_set(None, format_version="3"), "format_version"),
    "format-version-99": (_set(None, format_version=99), "format_version"),
    "max-input-negative": (_set(None, max_input_tokens=-1), "max_input_tokens"),
    "max-input-string": (_set(None, max_input_tokens="x"), "max_input_tokens"),
    "max-input-bool": (_set(None, max_input_tokens=True), "max_input_tokens"),
    "max-output-zero": (_set(None, max_output_tokens=0), "max_output_tokens"),
    "max-output-huge": (_set(None, max_output_tokens=2**63), "max_output_tokens"),  # past int64 in a batch's limits
    "max-input-huge": (_set(None, max_input_tokens=2**70), "max_input_tokens"),
    "opset-zero": (_set(None, opset=0), "opset"),
    "opset-float": (_set(None, opset=18.0), "opset"),
    "architecture-empty": (_set(None, architecture=""), "architecture"),
    "precision-null": (_set(None, precision=None), "precision"),
    "decoder-graph-unknown": (_set(None, decoder_graph="teapot"), "decoder_graph"),
    "no-repeat-negative": (_set(None, no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    "no-repeat-huge": (_set(None, no_repeat_ngram_size=2**64), "no_repeat_ngram_size"),
    "fallback-nan": (_set(None, fallback_below=float("nan")), "fallback_below"),
    "fallback-200": (_set(None, fallback_below=200), "fallback_below"),
    "fallback-string": (_set(None, fallback_below="90"), "fallback_below"),
    "fallback-span-negative": (_set(None, fallback_span=-1), "fallback_span"),
    "fallback-span-float": (_set(None, fallback_span=2.5), "fallback_span"),
    "gate-threshold-2": (_set(None, gate_threshold=2), "gate_threshold"),
    "validation-not-dict": (_set(None, validation=[]), "validation"),
    "fallback-400-digits": (_set(None, fallback_below=10**400), "fallback_below"),
    "unknown-field": (_set(None, fallback_bellow=0), "fallback_bellow"),
    "labels-of-a-classifier": (_set(None, labels=["wrong", "right"]), "labels"),
    "sliding-window-of-a-causal-lm": (_set(None, sliding_window=4), "sliding_window"),
    "gate-threshold-of-a-classifier": (_set(None, gate_threshold=0.5), "gate_threshold"),
    # special tokens
    "eos-beyond-vocab": (lambda m, p: m["special_tokens"].update(eos=m["decoder"]["vocab_size"]), "special_tokens.eos"),
    "pad-negative": (_set("special_tokens", pad=-1), "special_tokens.pad"),
    "pad-bool": (_set("special_tokens", pad=False), "special_tokens.pad"),
    "forced-bos-string": (_set("special_tokens", forced_bos="0"), "special_tokens.forced_bos"),
    "special-unknown-field": (_set("special_tokens", bos=0), "special_tokens.bos"),
    "eos-beyond-tokenizer": (_beyond_tokenizer, "special_tokens.eos"),
    # template
    "template-bogus": (_set("template", text="{bogus} {source} {candidates}"), "template.text"),
    "template-no-source": (_set("template", text="candidates: {candidates}"), "template.text"),
    "template-positional": (_set("template", candidate="{} {candidate}"), "template.candidate"),
    "template-no-candidate": (_set("template", candidate="<extra_id_{i}>"), "template.candidate"),
    "template-lone-brace": (_set("template", text="{source} {candidates} {"), "template.text"),
    "template-conversion": (_set("template", candidate="{candidate!r}"), "template.candidate"),
    "template-format-spec": (_set("template", text="{source:.2} {candidates}"), "template.text"),
    "template-not-string": (_set("template", separator=1), "template.separator"),
    "template-not-dict": (_set(None, template="source: {source}"), "template"),
    # NUL is render's own marker: a separator of "\x00s\x00" pasted the source into the input
    "template-nul": (_set("template", separator="\x00s\x00"), "template.separator"),
    "template-surrogate": (_set("template", text="\ud800 {source} {candidates}"), "template.text"),
    # decoder shape, checked against the graphs
    "decoder-missing": (_drop(None, "decoder"), "decoder"),
    "num-layers-plus-one": (_add("decoder", "num_layers", 1), "decoder.num_layers"),
    "num-layers-minus-one": (_add("decoder", "num_layers", -1), "decoder.num_layers"),
    "num-heads-wrong": (_add("decoder", "num_heads", 1), "decoder.num_heads"),
    "head-dim-wrong": (_add("decoder", "head_dim", 1), "decoder.head_dim"),
    "vocab-size-wrong": (_add("decoder", "vocab_size", 1), "decoder.vocab_size"),
    "num-layers-zero": (_set("decoder", num_layers=0), "decoder.num_layers"),
    "decoder-graph-swapped": (_other_decoder_graph, "decoder_graph"),
    "files-symlink-loop": (lambda m, p: ((p / "loop").symlink_to("loop"), m["files"].update(tokenizer="loop")),
                           "files.tokenizer"),
    "files-unknown-role": (_set("files", crosss="decoder_cross.onnx"), "files.crosss"),
    "file-name-surrogate": (_set("files", tokenizer="\ud800.json"), "files.tokenizer"),
    # a graph named in another's role (checksums are kept by file name, so they pass)
    "encoder-is-the-decoder": (lambda m, p: m["files"].update(encoder=m["files"]["decoder"]), "files.encoder"),
    "cross-is-the-decoder": (lambda m, p: m["files"].update(cross=m["files"]["decoder"]), "files.cross"),
    # tokenizer
    "empty-vocabulary": (_empty_vocabulary, "vocabulary"),
    "tokenizer-of-another-model": (_bigger_vocabulary, "decoder.vocab_size"),
}


@pytest.fixture
def bundle(bundles, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(bundles["t5"], path)
    return path


@pytest.mark.parametrize("defect", CORRECTOR_DEFECTS, ids=list(CORRECTOR_DEFECTS))
def test_tampered_corrector_is_refused(bundle, defect):
    change, field = CORRECTOR_DEFECTS[defect]
    _edit(bundle, change)
    with pytest.raises(BundleError) as error:
        Corrector.load(bundle)
    message = str(error.value)
    assert str(bundle) in message and field in message, message


def test_a_field_given_twice_is_refused(bundle):
    """Of two "kind" fields Python keeps the last without a word: which one lmcor reads is not the
    writer's to guess."""
    text = (bundle / MANIFEST_NAME).read_text()
    (bundle / MANIFEST_NAME).write_text(text.replace("{", '{"kind": "classifier", ', 1))
    with pytest.raises(BundleError, match="'kind' appears twice") as error:
        Corrector.load(bundle)
    assert str(bundle) in str(error.value)


@pytest.mark.parametrize("defect", ["absolute-path", "parent-path", "symlink-outside", "etc-passwd"])
def test_paths_are_confined_without_verify(bundle, defect):
    """verify=False skips the checksums, never the confinement."""
    change, field = CORRECTOR_DEFECTS[defect]
    _edit(bundle, change)
    _edit(bundle, _drop(None, "sha256"))
    with pytest.raises(BundleError, match=f"{field}: .* (is not a path inside|leads outside) the bundle"):
        load_manifest(bundle, verify=False)


def test_a_symlinked_checksum_entry_is_confined(bundle, tmp_path):
    (tmp_path / "secret").write_text("x")
    (bundle / "secret").symlink_to(tmp_path / "secret")
    _edit(bundle, lambda m, p: m["sha256"].update(secret=sha256_of(tmp_path / "secret")))
    with pytest.raises(BundleError, match=r'sha256\["secret"\]: .* leads outside the bundle'):
        load_manifest(bundle)


def test_external_data_cannot_leave_the_bundle(bundle, tmp_path):
    """The graphs' external-data locations are not in the manifest: read from the graphs where the
    files are verified, and refused by ONNX Runtime where not."""
    import onnx

    from lmcor.export.shared_weights import WEIGHTS_FILE

    encoder = bundle / "encoder_model.onnx"
    model = onnx.load(str(encoder), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"../{WEIGHTS_FILE}"
    onnx.save(model, str(encoder))
    shutil.copy(bundle / WEIGHTS_FILE, tmp_path / WEIGHTS_FILE)
    _reseal(bundle)
    with pytest.raises(BundleError, match=f"encoder_model.onnx: its weights file '../{WEIGHTS_FILE}' leads outside"):
        Corrector.load(bundle)
    with pytest.raises(BundleError, match="encoder_model.onnx: ONNX Runtime cannot load this model"):
        Corrector.load(bundle, verify=False)


@pytest.mark.parametrize("text", ['{"format_version": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["5000-digits", "nested-100000-deep"])
def test_a_manifest_python_cannot_parse_is_corrupt(bundle, text):
    """An integer past Python's 4,300 digits, nesting past its recursion limit: JSON still, refused alike."""
    (bundle / MANIFEST_NAME).write_text(text)
    with pytest.raises(BundleError, match="corrupt manifest"):
        Corrector.load(bundle)


def test_a_weights_files_name_is_read_across_the_graphs_blocks(tmp_path):
    """A graph is scanned a MiB at a time: an external-data entry astride two blocks is read whole."""
    from lmcor.runtime.bundle import _external_files

    key_value = b"\x0a\x08location\x12" + bytes([len(b"weights.bin")]) + b"weights.bin"
    entry = b"\x6a" + bytes([len(key_value)]) + key_value  # a TensorProto's external_data entry
    for at in (0, (1 << 20) - 9, (1 << 20) - 1, 1 << 20):
        graph = tmp_path / "graph.onnx"
        graph.write_bytes(b"\xff" * at + entry + b"\xff" * 100)
        assert _external_files(graph) == {"weights.bin"}, at
    graph.write_bytes(b"\xff" * 100 + entry[:-3])  # cut short: no name
    assert _external_files(graph) == set()
    graph.write_bytes(b"\x72" + bytes([len(key_value)]) + key_value)  # the model's metadata_props: no weights
    assert _external_files(graph) == set()


def test_a_graphs_metadata_named_location_is_no_weights_file(bundle):
    import onnx

    before = Corrector.load(bundle).correct_batch(REQUESTS)
    encoder = bundle / "encoder_model.onnx"
    model = onnx.load(str(encoder), load_external_data=False)
    onnx.helper.set_model_props(model, {"location": "/data/where-it-was-trained"})
    onnx.save(model, str(encoder))
    _reseal(bundle)
    assert [c.token_ids for c in Corrector.load(bundle).correct_batch(REQUESTS)] == [c.token_ids for c in before]


def test_without_checksums_verify_false_still_loads(bundle):
    _edit(bundle, _drop(None, "sha256"))
    assert isinstance(Corrector.load(bundle, verify=False).correct("she go home", ["She goes home."]), str)


def test_untouched_bundle_loads(bundle, bundles):
    _reseal(bundle)  # resealing changes nothing: the battery above fails on its defect alone
    assert load_manifest(bundle) == load_manifest(bundles["t5"])
    assert isinstance(Corrector.load(bundle).correct("she go home", ["She goes home."]), str)


@pytest.mark.parametrize("arch", ["bart", "t5v11"])
@pytest.mark.parametrize("field, delta", [("num_layers", 1), ("num_heads", 1), ("head_dim", 2), ("vocab_size", 1)])
def test_decoder_shape_is_checked_against_every_graph(bundles, tmp_path, arch, field, delta):
    """optimum's merged decoder (BART) and lmcor's ragged one (T5 v1.1, d_kv != d_model / heads)."""
    path = tmp_path / arch
    shutil.copytree(bundles[arch], path)
    Corrector.load(path)
    _edit(path, _add("decoder", field, delta))
    with pytest.raises(BundleError, match=f"{MANIFEST_NAME}: decoder.{field}: "):
        Corrector.load(path)


@pytest.fixture
def gate(tmp_path):
    path = tmp_path / "gate"
    shutil.copytree(shipped_bundle("gate"), path)
    return path


CLASSIFIER_DEFECTS = {
    "labels-empty": (_set(None, labels=[]), "labels"),
    "labels-duplicate": (_set(None, labels=["right", "right"]), "labels"),
    "labels-one": (_set(None, labels=["score"]), "labels"),  # a regression head
    "labels-not-strings": (_set(None, labels=[0, 1]), "labels"),
    "labels-vs-logits": (_set(None, labels=["a", "b", "right"]), "labels"),
    "gate-threshold-2": (_set(None, gate_threshold=2), "gate_threshold"),
    "gate-threshold-inf": (_set(None, gate_threshold=float("inf")), "gate_threshold"),
    "missing-model": (_drop("files", "model"), "files.model"),
    "kind-corrector": (_set(None, kind="corrector"), "labels"),  # a classifier's field, read by no corrector
    "template": (_set(None, template={"text": "{source} {candidates}"}), "template"),
    "fallback-of-a-corrector": (_set(None, fallback_below=50.0), "fallback_below"),
    "pad-beyond-vocab": (_set(None, vocab_size=30000, pad_token=30000), "pad_token"),
    "max-input-below-a-pair": (_set(None, max_input_tokens=4), "max_input_tokens: 4: a text pair needs 5 tokens"),
}


@pytest.mark.parametrize("defect", CLASSIFIER_DEFECTS, ids=list(CLASSIFIER_DEFECTS))
def test_tampered_classifier_is_refused(gate, defect):
    change, field = CLASSIFIER_DEFECTS[defect]
    Classifier.load(gate)
    _edit(gate, change)
    with pytest.raises(BundleError) as error:
        Classifier.load(gate)
    assert str(gate) in str(error.value) and field in str(error.value), str(error.value)


def _as_causal_lm(m: dict, p) -> None:
    """A causal-LM manifest over the T5 step decoder: its cache and logits are all the check reads."""
    for field in ("template", "decoder_graph"):
        m.pop(field)
    m.update(kind="causal-lm", files={"model": m["files"]["decoder"], "tokenizer": m["files"]["tokenizer"]})


@pytest.mark.parametrize("change, field", [
    (_add("decoder", "num_layers", 1), "decoder.num_layers"),
    (_add("decoder", "head_dim", 1), "decoder.head_dim"),
    (_drop("files", "model"), "files.model"),
    (_drop(None, "special_tokens"), "special_tokens"),
], ids=["num-layers", "head-dim", "missing-model", "no-special-tokens"])
def test_tampered_causal_lm_is_refused(bundle, change, field):
    _edit(bundle, _as_causal_lm)
    _edit(bundle, change)
    with pytest.raises(BundleError, match=f"{MANIFEST_NAME}: {field}: "):
        Generator.load(bundle)


def test_the_cli_prints_one_error_line(bundle, tmp_path, capsys):
    _edit(bundle, _set(None, format_version=True))
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"source": "a", "candidates": ["b"]}\n')
    assert main(["correct", "--model", str(bundle), str(requests)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and "Traceback" not in captured.err
    assert err[0].startswith(f"lmcor: error: {bundle}") and "format_version: unknown bundle format version true" in err[0]


@pytest.mark.parametrize("providers", ["FooProvider", "CUDAExecutionProvider"])
def test_unusable_providers_are_one_error_line_and_nothing_on_stdout(bundles, tmp_path, capsys, providers):
    """ONNX Runtime would print a banner to stdout and fall back to the CPU; the CUDA build is absent here."""
    if providers in sessions.ort.get_available_providers():
        pytest.skip(f"{providers} is available here")
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"source": "a", "candidates": ["b"]}\n')
    assert main(["correct", "--model", str(bundles["t5"]), "--providers", providers, str(requests)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and err[0].startswith("lmcor: error: ")
    assert providers in err[0] and "CPUExecutionProvider" in err[0]


def test_providers_must_be_a_list_of_names(bundles):
    from lmcor import InputError

    for wrong in ("CPUExecutionProvider", [1], [], "", 0):  # an empty list is no list of providers either
        with pytest.raises(InputError, match="providers must be a list of names"):
            Corrector.load(bundles["t5"], providers=wrong)


def test_loading_on_the_cpu_leaves_the_processs_stdout_alone(bundles, monkeypatch):
    """sys.stdout is the process's: swapped while one thread loads, another's prints are lost, and two
    threads' swaps undone out of order leave it swapped for good. Only a provider that can print
    (one besides the CPU) has its start's output caught."""
    import sys

    stdout, seen = sys.stdout, []
    real = sessions.ort.InferenceSession

    def watched(*args, **kwargs):
        seen.append(sys.stdout)
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions.ort, "InferenceSession", watched)
    Corrector.load(bundles["t5"], providers=["CPUExecutionProvider"])  # a CUDA machine's default prints
    assert seen and all(out is stdout for out in seen)


def test_a_preference_list_skips_providers_this_build_lacks(bundles, caplog):
    if "CUDAExecutionProvider" in sessions.ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        corrector = Corrector.load(bundles["t5"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert corrector.providers == ["CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records if "skipped:" in r.getMessage()] == [
        "not in this ONNX Runtime build, skipped: CUDAExecutionProvider"]  # once, not once a session
