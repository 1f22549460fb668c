"""`recipes/from_bundle.py`: the Hugging Face checkpoint rebuilt from a corrector bundle's graphs."""

import json

import pytest

from lmcor.recipes.from_bundle import STATES_TOLERANCE, check, main, rebuild
from lmcor.runtime.errors import InputError


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    from conftest import make_requests

    path = tmp_path_factory.mktemp("from-bundle") / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_requests(6, seed=5)) + "\n")
    return path


@pytest.mark.parametrize("arch", ["t5", "t5v11"])  # relu with tied embeddings; gated-gelu, untied, d_kv x heads != d_model
def test_the_rebuilt_checkpoint_is_the_exported_one(arch, bundles, checkpoints, requests_file, tmp_path):
    from transformers import T5ForConditionalGeneration

    model, tokenizer = rebuild(bundles[arch])
    result = check(model, bundles[arch], requests_file, 6)
    assert result["states_relative_difference"] <= STATES_TOLERANCE and result["identical_tokens"] == 1.0
    original = T5ForConditionalGeneration.from_pretrained(checkpoints[arch])
    for key, config in ((k, model.config) for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                                                     "relative_attention_num_buckets", "tie_word_embeddings",
                                                     "feed_forward_proj")):
        assert getattr(config, key) == getattr(original.config, key), key
    assert main([str(tmp_path / "hf"), "--bundle", str(bundles[arch]), "--check", str(requests_file),
                 "--requests", "2"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_what_it_cannot_rebuild_is_refused_by_name(bundles, requests_file, tmp_path, capsys):
    with pytest.raises(InputError, match="bart"):
        rebuild(bundles["bart"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main([str(tmp_path / "taken"), "--bundle", str(bundles["t5"])]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    # A check file that is missing or not UTF-8: one line naming it, nothing written.
    (tmp_path / "latin1.jsonl").write_bytes(b'{"source": "caf\xe9", "candidates": ["a"]}\n')
    for name, said in (("missing.jsonl", "No such file"), ("latin1.jsonl", "line 1: not valid UTF-8")):
        assert main([str(tmp_path / "hf"), "--bundle", str(bundles["t5"]), "--check", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name}" in err and said in err and "Traceback" not in err
        assert not (tmp_path / "hf").exists()


def test_the_rebuilt_checkpoint_decodes_with_the_bundles_ngram_ban(bundles, requests_file, tmp_path):
    """An export of the rebuilt checkpoint reads the ban from its generation config."""
    import shutil

    from lmcor.runtime.bundle import update_manifest

    bundle = shutil.copytree(bundles["t5"], tmp_path / "bundle")
    update_manifest(bundle, no_repeat_ngram_size=3)
    assert main([str(tmp_path / "hf"), "--bundle", str(bundle), "--check", str(requests_file), "--requests", "3"]) == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["no_repeat_ngram_size"] == 3
