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
    assert main([str(tmp_path / "taken"), "--bundle", str(bundles["t5"])]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err
