"""Shared fixtures: tiny random-init checkpoints built from configs, with tokenizers trained here.

Nothing is downloaded. Each architecture the exporter supports is covered by one checkpoint:
T5 (relu, tied embeddings), T5 v1.1 / Flan-T5 (gated-gelu, untied, d_kv != d_model / num_heads)
and BART. Bundles are exported once per session through the real exporter.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU through the interpreter
# The API fuzz's Hypothesis keeps its files out of the repository's folder.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "lmcor-tests-hypothesis"))

import random
from pathlib import Path

import pytest

ARCHITECTURES = ("t5", "t5v11", "bart")

_SUBJECTS = ["the cat", "My brother", "a small dog", "Our teacher", "They", "she", "The 3 students", "John's car",
             "an old man", "Paris", "the results", "We", "He", "the company"]
_VERBS = ["go to", "goes to", "went to", "has seen", "likes", "don't like", "is waiting for", "were reading",
          "will visit", "bought", "wrote about", "asked about", "can't find", "moved to"]
_OBJECTS = ["school every day", "the station", "a red apple", "\"spicy\" food", "the new house in 2019",
            "his friends, quietly", "the report", "an umbrella", "the city center", "some books",
            "the meeting at 10", "their garden"]
_ENDS = [".", "!", "?", ",", "..."]


def english_sentences(count: int, seed: int) -> list[str]:
    """Varied ordinary-English sentences: capitals, digits, commas, apostrophes, quotes, ?, !."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.4:
            words += ["and", rng.choice(_SUBJECTS).lower(), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        out.append(" ".join(words) + rng.choice(_ENDS))
    return out


def make_requests(count: int, seed: int) -> list[dict]:
    """Requests of varied shapes: 1-5 candidates, short to long, some noisy."""
    rng = random.Random(seed)
    sentences = english_sentences(count * 6, seed)
    requests = []
    for n in range(count):
        k = rng.randint(1, 5)
        source = sentences[n * 6]
        candidates = [sentences[n * 6 + 1 + j] if rng.random() < 0.5 else source.replace("e", "a", j) for j in range(k)]
        requests.append({"id": n, "source": source, "candidates": candidates})
    return requests


def _train_tokenizer(arch: str):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    corpus = english_sentences(400, seed=1) + ["source: candidates:"] * 20
    if arch == "bart":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", mask_token="<mask>")
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(4)]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=specials[3:])


def build_checkpoint(arch: str, path: Path, positions: int = 512) -> Path:
    import torch
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        MT5Config,
        MT5ForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    tokenizer = _train_tokenizer(arch)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if arch == "bart":
        config = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=positions, pad_token_id=1, bos_token_id=0,
                            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
        model = BartForConditionalGeneration(config)
        with torch.no_grad():
            model.final_logits_bias[0, config.eos_token_id] = -0.3  # outputs run to the forced EOS
    else:  # t5, t5v11 (gated, untied) and mt5 (T5 v1.1's shape under its own model type)
        gated = arch in ("t5v11", "mt5")
        kind, model_class = (MT5Config, MT5ForConditionalGeneration) if arch == "mt5" else (T5Config,
                                                                                          T5ForConditionalGeneration)
        config = kind(vocab_size=vocab, d_model=32, d_kv=12 if gated else 8, d_ff=64, num_layers=2,
                      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = model_class(config)
        with torch.no_grad():
            model.lm_head.weight[config.eos_token_id] *= 2.5 if gated else 15.0  # some outputs end early, some run long
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def bundles(checkpoints, tmp_path_factory) -> dict[str, Path]:
    from lmcor.export import export_corrector

    root = tmp_path_factory.mktemp("bundles")
    for arch, checkpoint in checkpoints.items():
        export_corrector(checkpoint, root / arch)
    return {arch: root / arch for arch in ARCHITECTURES}


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 causal-LM checkpoint (64 positions)."""
    import torch
    from test_generator import _tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    checkpoint = tmp_path_factory.mktemp("gpt2")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="session")
def gpt2_bundle(gpt2_checkpoint, tmp_path_factory) -> Path:
    """A tiny GPT-2 causal-LM bundle (64 positions, 16 output tokens)."""
    from lmcor.export.causal_lm import export_causal_lm

    bundle = tmp_path_factory.mktemp("bundles") / "gpt2"
    export_causal_lm(gpt2_checkpoint, bundle, max_output_tokens=16)
    return bundle
