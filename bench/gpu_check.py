"""The stages of `bench/gpu_check.sh`, one per call: each writes one JSON result and never raises past
its stage (a failure is recorded as the stage's result), so one failing stage loses nothing else.

    python bench/gpu_check.py STAGE --work DIR [--checkpoint HF_DIR]

Stages: env, bundles, tokens, encoder, latency, report (report: DIR/*.json -> gpu_check.json and
gpu_check.txt in --out). Without CUDA every measuring stage records {"status": "skipped",
"reason": "no CUDA"}. The issue's targets are printed beside each number: tokens identical to the
CPU path in fp32; packed encoder >= 2x padded ONNX Runtime CUDA; batch-1 <= 0.3x transformers bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "splits" / "test.jsonl"
STAGES = ("env", "bundles", "kernels", "tokens", "encoder", "latency")
TARGET_ENCODER_SPEEDUP = 2.0
TARGET_LATENCY_RATIO = 0.3
# |packed - transformers| of fp32 states, as a share of their largest magnitude: float rounding through the
# layers (the H200 run: 1.4e-4 on states reaching 3.8, 4e-5 of it); TF32 products would miss it ~10x
PACKED_FP32_TOLERANCE = 1e-4
REQUESTS_TOKENS = 256  # test-split requests decoded on CPU and CUDA
REQUESTS_LATENCY = 32  # batch-1 requests timed per backend
ENCODER_REQUESTS, ENCODER_K, ENCODER_LENGTHS = 64, 5, (16, 96)


class Recorded(dict):
    """A stage's results, written to its JSON file as each one is set: a stage cut short by its time
    limit, or failing later, keeps what it measured (status "partial" until the stage returns)."""

    def __init__(self, path: Path):
        super().__init__(status="partial")
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        temp = self.path.with_name(self.path.name + ".partial")  # a stage killed mid-write keeps its last file
        temp.write_text(json.dumps(self, indent=2) + "\n")
        os.replace(temp, self.path)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _attempt(out: dict, key: str, measure) -> None:
    """out[key] = measure(), or the failure: one measurement failing leaves the others."""
    try:
        out[key] = measure()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        out[key] = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def _cuda() -> str | None:
    """Why CUDA cannot be used here, or None."""
    try:
        import torch  # noqa: F401 - first: its CUDA and cuDNN libraries are the ones onnxruntime-gpu preloads
    except ImportError:
        pass
    try:
        import onnxruntime as ort
    except ImportError:
        return "no onnxruntime"
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - a CPU build or missing nvidia packages: the check below says so
            pass
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no CUDA (this onnxruntime has no CUDAExecutionProvider; see ../shared/gpu/README.md)"
    from lmcor.runtime.bundle import shipped_bundle
    from lmcor.runtime.sessions import cuda_device_count

    if cuda_device_count() == 0:
        return "no CUDA (no device)"
    # The GPU build lists CUDA whether or not its library loads, and falls back to the CPU without
    # a word: only a session that runs on it shows that it does.
    try:
        session = ort.InferenceSession(str(shipped_bundle("default") / "encoder_model.onnx"),
                                       providers=["CUDAExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return f"no CUDA (a session on it fails: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return f"no CUDA (sessions fall back to {session.get_providers()[0]}: the CUDA provider library did not load)"
    return None


def _bundles(work: Path) -> dict[str, Path]:
    from lmcor.runtime.bundle import shipped_bundle

    out = {"fp32": shipped_bundle("default")}
    out.update({p: work / f"bundle-{p}" for p in ("fp16", "bf16") if (work / f"bundle-{p}" / "lmcor.json").is_file()})
    return out


def _requests(count: int) -> list[dict]:
    lines = DATA.read_text(encoding="utf-8").splitlines()[:count]
    return [{"source": r["source"], "candidates": r["candidates"]} for r in map(json.loads, lines)]


def stage_env(work: Path, args, out: dict) -> dict:
    import platform

    out["python"] = platform.python_version()
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name(0)
    except ImportError:
        out["torch"] = None
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import onnxruntime as ort

    out.update(onnxruntime=ort.__version__, onnxruntime_file=ort.__file__, providers=ort.get_available_providers())
    reason = _cuda()
    out["cuda"] = reason or "yes"
    try:
        from lmcor.runtime import core

        out["compiled_core"] = core.built() is not None
    except Exception as e:  # noqa: BLE001
        out["compiled_core"] = f"not importable: {e}"
    return out


def stage_bundles(work: Path, args, out: dict) -> dict:
    """fp16 and bf16 copies of the shipped fp32 default corrector (`export/half.py`; the GPU machine has
    no optimum to export from the checkpoint)."""
    from lmcor.export.half import convert_bundle
    from lmcor.runtime.bundle import shipped_bundle

    def convert(precision: str) -> dict:
        start = time.perf_counter()
        manifest = convert_bundle(shipped_bundle("default"), work / f"bundle-{precision}", precision, overwrite=True)
        return {"seconds": round(time.perf_counter() - start, 2), "half_matmuls": manifest.validation["half_matmuls"],
                "fp32_matmuls": manifest.validation["fp32_matmuls"]}

    for precision in ("fp16", "bf16"):
        _attempt(out, precision, lambda: convert(precision))
    return out


def stage_tokens(work: Path, args, out: dict) -> dict:
    """Greedy tokens of the test split's first requests: CPU fp32 (the reference) against CUDA fp32
    (must be identical) and CUDA fp16/bf16 (agreement reported); requests/s at batch 16 on CUDA."""
    reason = _cuda()
    if reason:
        return {"status": "skipped", "reason": reason}
    from lmcor import Corrector
    from lmcor.runtime.decode import cache_layout

    requests = _requests(REQUESTS_TOKENS)
    bundles = _bundles(work)

    def run(path: Path, provider: str, caches: str = "") -> tuple[list[tuple], dict]:
        """Each request's (text, token_ids, fallback): a fallback's token_ids are empty, so the text
        tells its outputs apart."""
        os.environ["LMCOR_CACHES"] = caches  # "": the device's default (on the device on CUDA)
        corrector = Corrector.load(path, providers=[provider])
        corrector.correct_batch(requests[:16], batch_size=16)  # warm-up: kernels, allocator
        start = time.perf_counter()
        results = corrector.correct_batch(requests, batch_size=16)
        seconds = time.perf_counter() - start
        return [(r.text, r.token_ids, r.fallback) for r in results], {
            "provider": corrector.providers[0], "caches": cache_layout(corrector.sessions.device),
            "requests_per_s": round(len(requests) / seconds, 1)}

    reference, cpu = run(bundles["fp32"], "CPUExecutionProvider")
    out.update(requests=len(requests), cpu_fp32=cpu)

    def compared(path: Path, provider: str, caches: str = "", target: bool = False) -> dict:
        tokens, info = run(path, provider, caches)
        same = sum(a == b for a, b in zip(tokens, reference))
        info["identical_to_cpu_fp32"] = same / len(requests)
        if target:
            info["target"] = "identical on 100%"
            info["met"] = same == len(requests) and info["provider"] == "CUDAExecutionProvider"
            info["must"] = True  # correctness: missed, the check fails
        return info

    for precision, path in bundles.items():  # one precision failing (bf16 has never run) leaves the others
        _attempt(out, f"cuda_{precision}", lambda: compared(path, "CUDAExecutionProvider", target=precision == "fp32"))
    # The ragged decoder's caches in host arrays instead, as on the CPU: same tokens, and what keeping
    # them on the device is worth.
    _attempt(out, "cuda_fp32_host_caches", lambda: compared(bundles["fp32"], "CUDAExecutionProvider", caches="host"))
    os.environ.pop("LMCOR_CACHES", None)
    if "fp16" in bundles:  # the fp16 graphs on CPU (ONNX Runtime casts what it has no fp16 kernel for)
        _attempt(out, "cpu_fp16", lambda: compared(bundles["fp16"], "CPUExecutionProvider"))
    return out


def _encoder_workload(vocab: int, seed: int = 0):
    """64 requests: a source and K=5 candidates, each 16-96 tokens, separated, capped at 512."""
    rng = random.Random(seed)
    low, high = ENCODER_LENGTHS
    inputs = []
    for _ in range(ENCODER_REQUESTS):
        ids = []
        for part in range(1 + ENCODER_K):
            ids += ([3] if part else []) + [rng.randrange(4, vocab) for _ in range(rng.randint(low, high))]
        inputs.append((ids[:511] + [1]))
    return inputs


def _time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn()` (which synchronizes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _checkpoint(args):
    if not args.checkpoint or not (Path(args.checkpoint) / "config.json").is_file():
        return None
    import torch
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32).eval()


def stage_encoder(work: Path, args, out: dict) -> dict:
    """Packed (Triton) vs padded (ONNX Runtime CUDA) encoder throughput on the same 64 requests. The
    packed encoder and transformers need PyTorch's CUDA only: they run without onnxruntime-gpu too."""
    reason = _cuda()
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA for PyTorch"}
    import numpy as np
    import onnxruntime as ort
    from lmcor.kernels.encoder import EncoderWeights, encode_packed, unpack
    from lmcor.runtime.batching import pad_batch
    from lmcor.runtime.bundle import load_manifest
    from lmcor.runtime.sessions import with_options

    model = _checkpoint(args)
    if model is None:
        return {"status": "skipped", "reason": "no checkpoint for the packed encoder's weights "
                "(run `bash bench/gpu_check.sh --prepare CHECKPOINT` on the CPU machine and carry .cache/gpu_check)"}
    bundles = _bundles(work)
    inputs = _encoder_workload(model.config.vocab_size)
    ids, mask = pad_batch([np.asarray(x, dtype=np.int64) for x in inputs], 0)
    real = int(mask.sum())
    out.update(requests=len(inputs), real_tokens=real, padded_tokens=int(ids.size), width=int(ids.shape[1]))
    out["packing_ceiling"] = round(ids.size / real, 2)  # the most that skipping padding alone can give
    padded = {}
    for precision, path in bundles.items() if reason is None else ():
        try:
            manifest = load_manifest(path)
            session = ort.InferenceSession(str(path / manifest.files["encoder"]),
                                           providers=with_options(["CUDAExecutionProvider"]))
            io = session.io_binding()
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_output("last_hidden_state", "cuda")
            seconds = _time(lambda: session.run_with_iobinding(io))
        except Exception as e:  # noqa: BLE001 - one precision failing leaves the others
            out[f"padded_onnxruntime_{precision}"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
            continue
        padded[precision] = seconds
        out[f"padded_onnxruntime_{precision}"] = {"ms": round(seconds * 1e3, 3), "real_tokens_per_s": round(real / seconds),
                                                  "provider": session.get_providers()[0]}
    if reason is not None:
        out["padded_onnxruntime"] = {"status": "skipped", "reason": reason}
    cuda_ids, cuda_lengths = torch.from_numpy(ids).cuda(), torch.from_numpy(mask.sum(axis=1)).cuda()
    segments = torch.zeros_like(cuda_ids)
    cuda_mask = torch.from_numpy(mask).cuda()
    with torch.no_grad():  # what the packed states are checked against: transformers in fp32 (no TF32)
        reference = model.encoder.to("cuda")(input_ids=cuda_ids, attention_mask=cuda_mask)[0].float()
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        try:
            weights = EncoderWeights.from_t5(model, dtype=dtype, device="cuda")

            def packed():  # as the corrector runs it: the packed states unpacked into the padded batch
                with torch.no_grad():
                    unpack(*encode_packed(weights, cuda_ids, segments, cuda_lengths), ids.shape[1])
                torch.cuda.synchronize()

            seconds = _time(packed)
            with torch.no_grad():
                states, cu = encode_packed(weights, cuda_ids, segments, cuda_lengths)
                differs = (unpack(states, cu, ids.shape[1]).float() - reference)[cuda_mask.bool()].abs().max()
        except Exception as e:  # noqa: BLE001
            out[f"packed_triton_{name}"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
            continue
        entry = {"ms": round(seconds * 1e3, 3), "real_tokens_per_s": round(real / seconds),
                 "max_abs_diff_vs_transformers_fp32": float(differs)}
        if name == "fp32":  # full fp32 products (no TF32): transformers' states within float rounding
            within = PACKED_FP32_TOLERANCE * float(reference[cuda_mask.bool()].abs().max())
            entry.update(equal_within=within, equal=float(differs) <= within)
        if name in padded:
            entry["speedup_vs_padded_onnxruntime"] = round(padded[name] / seconds, 2)
            entry["target"] = f">= {TARGET_ENCODER_SPEEDUP}x"
            entry["met"] = padded[name] / seconds >= TARGET_ENCODER_SPEEDUP
        out[f"packed_triton_{name}"] = entry
    def transformers_padded() -> dict:
        encoder = model.encoder.to(device="cuda", dtype=torch.bfloat16)

        def run():
            with torch.no_grad():
                encoder(input_ids=cuda_ids, attention_mask=cuda_mask)
            torch.cuda.synchronize()

        seconds = _time(run)
        return {"ms": round(seconds * 1e3, 3), "real_tokens_per_s": round(real / seconds)}

    _attempt(out, "padded_transformers_bf16", transformers_padded)
    return out


def stage_latency(work: Path, args, out: dict) -> dict:
    """Batch-1 latency per request: lmcor on CUDA (fp32/fp16/bf16 bundles) vs transformers bf16 `generate`
    (which needs PyTorch's CUDA only)."""
    reason = _cuda()
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA for PyTorch"}
    from lmcor import Corrector

    requests = _requests(REQUESTS_LATENCY)
    out["requests"] = len(requests)
    corrector = Corrector.load(_bundles(work)["fp32"])  # its tokenizer and template, for transformers' inputs
    if reason is not None:
        out["lmcor_cuda"] = {"status": "skipped", "reason": reason}
    for precision, path in _bundles(work).items() if reason is None else ():
        try:
            cuda = Corrector.load(path, providers=["CUDAExecutionProvider"])
            for r in requests[:4]:
                cuda.correct_batch([r], batch_size=1)
            times, tokens = [], 0
            for r in requests:
                start = time.perf_counter()
                [result] = cuda.correct_batch([r], batch_size=1)
                times.append(time.perf_counter() - start)
                tokens += result.stats.output_tokens
        except Exception as e:  # noqa: BLE001 - one precision failing leaves the others
            out[f"lmcor_cuda_{precision}"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
            continue
        out[f"lmcor_cuda_{precision}"] = {"median_ms": round(statistics.median(times) * 1e3, 3), "provider": cuda.providers[0],
                                          "mean_output_tokens": round(tokens / len(requests), 1)}
    model = _checkpoint(args)
    if model is None:
        out["transformers_bf16"] = {"status": "skipped", "reason": "no checkpoint (bash bench/gpu_check.sh --prepare)"}
        return out
    _attempt(out, "transformers_bf16", lambda: _transformers_latency(model, corrector, requests))
    reference = out["transformers_bf16"].get("median_ms")
    for key in [k for k in out if k.startswith("lmcor_cuda_") and "median_ms" in out[k]] if reference else ():
        ratio = out[key]["median_ms"] / reference
        out[key] = {**out[key], "ratio_to_transformers_bf16": round(ratio, 3), "target": f"<= {TARGET_LATENCY_RATIO}x",
                    "met": ratio <= TARGET_LATENCY_RATIO}
    return out


def _transformers_latency(model, corrector, requests: list[dict]) -> dict:
    """transformers bf16 `generate`, batch 1, on the corrector's own inputs: median ms per request."""
    import torch
    from lmcor.runtime.request import Request
    from lmcor.runtime.tokens import encode_requests

    model = model.to(device="cuda", dtype=torch.bfloat16)
    manifest = corrector.manifest
    inputs = encode_requests(corrector.tokenizer, manifest.template,
                             [Request(r["source"], tuple(r["candidates"])) for r in requests], manifest.max_input_tokens)

    def generate(ids):
        x = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            result = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=manifest.max_output_tokens,
                                    do_sample=False, num_beams=1, no_repeat_ngram_size=manifest.no_repeat_ngram_size,
                                    decoder_start_token_id=manifest.special_tokens.decoder_start,
                                    eos_token_id=manifest.special_tokens.eos, pad_token_id=manifest.special_tokens.pad)
        torch.cuda.synchronize()
        return result.shape[1] - 1

    usable = [x.ids.tolist() for x in inputs if hasattr(x, "ids")]
    for ids in usable[:4]:
        generate(ids)
    times, tokens = [], 0
    for ids in usable:
        start = time.perf_counter()
        tokens += generate(ids)
        times.append(time.perf_counter() - start)
    return {"median_ms": round(statistics.median(times) * 1e3, 3), "mean_output_tokens": round(tokens / len(usable), 1)}


def stage_kernels(work: Path, args, out: dict) -> dict:
    """The kernel tests' JUnit file (written by the shell script's pytest run) -> counts and failures."""
    import xml.etree.ElementTree as ET

    path, rc = work / "kernels.xml", work / "kernels.pytest"
    if not path.is_file():
        timed_out = rc.is_file() and rc.read_text().strip() in ("124", "137")
        return {"status": "no result", "reason": "pytest timed out before its report" if timed_out
                else "pytest wrote no report (see gpu_check.log)"}
    cases = ET.parse(path).getroot().iter("testcase")
    out.update(passed=[], failed=[], skipped=[])
    for case in cases:
        name = case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"].append(name)
        else:
            out["passed"].append(name)
    out["gpu_cases_run"] = sum("gpu" in n for n in out["passed"] + out["failed"])
    out["pytest_exit_status"] = int(rc.read_text()) if rc.is_file() else None
    if out["failed"] or out["pytest_exit_status"] not in (0, None):
        out["status"] = "failed"
    elif not out["gpu_cases_run"]:
        out["status"] = "skipped"
        out["reason"] = "no GPU case ran (no CUDA device, or TRITON_INTERPRET=1)"
    return out


def report(work: Path, out_dir: Path, dry_run: bool) -> dict:
    """Merge the stages' results into gpu_check.json and a readable gpu_check.txt."""
    results = {}
    for stage in STAGES:
        path, status = work / f"{stage}.json", work / f"{stage}.status"
        if dry_run:
            results[stage] = {"status": "not run (dry run)"}
        elif path.is_file():
            results[stage] = json.loads(path.read_text())
            if results[stage].get("status") == "partial":  # killed at its limit: what it measured till then
                rc = status.read_text().strip() if status.is_file() else "?"
                results[stage]["reason"] = "cut short: " + ("timed out" if rc in ("124", "137") else f"exit status {rc}")
        else:
            rc = status.read_text().strip() if status.is_file() else "?"
            what = {"124": "timed out", "137": "timed out", "budget": "not run: the check's time budget was spent"}
            results[stage] = {"status": "no result", "reason": f"{what.get(rc, f'exit status {rc}')} (see gpu_check.log)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["lmcor GPU check" + (" (dry run: nothing measured)" if dry_run else "")]
    for stage, result in results.items():
        lines.append(f"\n[{stage}]")
        lines += [f"  {key}: {json.dumps(value)}" for key, value in result.items()]
    lines += ["\n[targets]", *(f"  {line}" for line in targets(results))]
    (out_dir / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    return results


def failures(results: dict, *, skipped: bool = False) -> list[str]:
    """The stages, and measurements within them, that failed, were cut short or left no result, or
    are not correct (a target that `must` be met, as fp32 tokens identical to the CPU's, missed; or
    states not `equal` to transformers' within their tolerance); with `skipped`, those skipped too
    (no CUDA, no checkpoint). A speed target missed is a result, not a failure."""
    bad = ("failed", "partial", "no result") + (("skipped",) if skipped else ())
    out = [stage for stage, result in results.items() if result.get("status") in bad]
    out += [f"{stage}.{key}" for stage, key, value in _measurements(results)
            if value.get("status") in bad or value.get("equal") is False
            or (value.get("must") and value.get("met") is False)]
    return out


def targets(results: dict) -> list[str]:
    """One line per measurement held to a target: met or missed."""
    out = []
    for stage, key, value in _measurements(results):
        if "met" in value:
            out.append(f"{stage}.{key}: {'met' if value['met'] else 'MISSED'} ({value.get('target')})")
        if "equal" in value:
            out.append(f"{stage}.{key}: {'equal' if value['equal'] else 'NOT EQUAL'} to transformers' "
                       f"(within {value.get('equal_within')})")
    return out


def _measurements(results: dict) -> list[tuple[str, str, dict]]:
    """(stage, name, measurement) of every measurement the stages' results hold."""
    return [(stage, key, value) for stage, result in results.items() for key, value in result.items()
            if isinstance(value, dict)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=(*STAGES, "report"))
    parser.add_argument("--work", type=Path, required=True, help="folder of the stages' results and bundles")
    parser.add_argument("--out", type=Path, help="report: where gpu_check.json and gpu_check.txt go")
    parser.add_argument("--checkpoint", help="Hugging Face folder of the default corrector (packed encoder, transformers)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--strict", action="store_true",
                        help="report: exit 1 where anything failed, was cut short or was skipped (no CUDA)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "report":
        results = report(args.work, args.out or args.work, args.dry_run)
        print((args.out or args.work) / "gpu_check.txt", "written;", len(results), "stages")
        for line in targets(results):
            print(line)
        bad = failures(results, skipped=args.strict)  # a GPU check that measured nothing on a GPU did not pass
        if args.strict and bad:  # (after each stage, those still to run have no result yet)
            print("failed, cut short, skipped, not correct or without a result:", ", ".join(bad))
            return 1
        return 0
    start = time.perf_counter()
    out = Recorded(args.work / f"{args.stage}.json")
    try:
        result = dict(globals()[f"stage_{args.stage}"](args.work, args, out))
    except Exception as e:  # noqa: BLE001 - recorded as the stage's result, the next stages still run
        traceback.print_exc()
        result = {**out, "status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if result.get("status") == "partial":
        result["status"] = "ok"
    result["seconds"] = round(time.perf_counter() - start, 1)
    (args.work / f"{args.stage}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.stage}: {result['status']} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
