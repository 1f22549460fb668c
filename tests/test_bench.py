"""`lmcor bench` smoke run: lmcor and one peer on a tiny shape; no timing is asserted."""

import json
import threading
from pathlib import Path

import pytest

from lmcor.cli import main

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples" / "requests.jsonl")

FIELDS = {"load_s", "rss_mb", "latency_ms", "ms_per_output_token", "throughput", "agreement_with_transformers"}
LMCOR_FIELDS = {"encoder_ms", "decoder_step_ms", "decoder_calls_per_token", "encoder_gflops", "encoder_vs_peak",
                "decode_gflops", "decode_vs_peak", "decode_weight_gbps", "decode_vs_copy_bandwidth"}


@pytest.fixture(autouse=True)
def _torch_threads():
    """`bench --threads 1` sets PyTorch's threads for the process: the tests after these keep theirs."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--shape", "tiny", "--backends", "lmcor,transformers", "--requests", "2", "--rounds", "1",
                 "--new-tokens", "4", "--source", "8", "--candidate", "8", "--batch-size", "2",
                 "--out", str(out), "--cache", str(tmp_path / "cache"), "--threads", "1", "--sweeps"])
    assert code == 0
    table = capsys.readouterr().out
    assert "lmcor" in table and "transformers" in table and "p50 ms" in table
    report = json.loads((out / "bench.json").read_text())
    assert set(report) >= {"machine", "workload", "model", "backends", "skipped", "sweeps", "ratios", "peak_rss_mb"}
    assert report["machine"]["gemm_gflops"] > 0 and report["machine"]["copy_gbps"] > 0
    assert report["workload"]["new_tokens"] == 4 and report["workload"]["forced"] is True
    # a decoder step reads the weights of lmcor's step graph: the cross-attention keys and values are
    # made once a request, by its cross graph
    from lmcor.bench.backends import bundle_for
    from lmcor.bench.host import linear_params
    from lmcor.runtime.bundle import load_manifest

    bundle = bundle_for(Path(report["model"]["path"]), tmp_path / "cache")
    files = load_manifest(bundle).files
    assert report["model"]["decoder_params"] == linear_params(bundle / files["decoder"])[0]
    assert report["model"]["cross_kv_params"] == linear_params(bundle / files["cross"])[0] > 0
    for name in ("lmcor", "transformers"):
        entry = report["backends"][name]
        assert FIELDS <= set(entry)
        assert set(entry["latency_ms"]) == {"p50", "p90", "p99", "mean"}
    assert LMCOR_FIELDS <= set(report["backends"]["lmcor"])
    assert report["backends"]["lmcor"]["decoder_calls_per_token"] == 1.0  # forced length, no drafts
    assert report["backends"]["lmcor"]["agreement_with_transformers"] == 1.0  # same tokens as generate
    assert set(report["sweeps"]["latency_vs_k_ms"]["lmcor"]) == {"1", "3", "5", "8"}
    assert report["ratios"]["lmcor"]["best_peer_latency"] == "transformers"
    for image in ("latency.png", "latency_vs_k.png", "throughput_vs_batch.png"):
        assert (out / image).stat().st_size > 1000


def test_bench_on_real_requests(checkpoints, tmp_path, capsys):
    from conftest import make_requests

    data = tmp_path / "requests.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_requests(3, seed=2)) + "\n")
    out = tmp_path / "out"
    code = main(["bench", "--model", str(checkpoints["t5"]), "--data", str(data), "--backends", "lmcor,transformers",
                 "--requests", "3", "--rounds", "1", "--natural", "--batch-size", "4",
                 "--out", str(out), "--cache", str(tmp_path / "cache"), "--threads", "1"])
    assert code == 0
    assert "req/s@3" in capsys.readouterr().out  # the batch that ran, not --batch-size
    report = json.loads((out / "bench.json").read_text())
    assert report["backends"]["lmcor"]["throughput"]["batch_size"] == 3
    assert report["workload"]["name"] == "text requests.jsonl" and report["workload"]["forced"] is False
    assert report["workload"]["requests"] == 3 and "sweeps" not in report  # opt-in
    assert report["backends"]["lmcor"]["agreement_with_transformers"] == 1.0


def test_lmcor_failing_to_load_fails_the_comparison(tmp_path, capsys, monkeypatch):
    """lmcor is what is compared: a table of its peers alone, exit 0, would read as a run that worked."""
    from lmcor.bench import backends

    def broken(*args, **kwargs):
        raise ValueError("no bundle today")

    monkeypatch.setattr(backends.Lmcor, "__init__", broken)
    assert main(["bench", "--shape", "tiny", "--backends", "lmcor,transformers", "--requests", "1", "--rounds", "1",
                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 2
    assert "lmcor: error: lmcor failed to load: no bundle today" in capsys.readouterr().err


def test_unknown_backend_is_one_line(tmp_path, capsys):
    assert main(["bench", "--backends", "lmcor,teapot", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown backend(s) teapot" in err[0]


def test_bench_drafts_on_vs_off(bundles, tmp_path, capsys):
    from conftest import make_requests

    data = tmp_path / "requests.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_requests(4, seed=2)) + "\n")
    out = tmp_path / "out"
    code = main(["bench", "--drafts", "--bundle", str(bundles["t5v11"]), "--data", str(data), "--requests", "4",
                 "--rounds", "1", "--batch-size", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "drafts.json").read_text())
    assert report["identical_outputs"] == report["requests"] == 4
    assert report["modes"]["drafts off"]["decoder_calls_per_token"] == 1.0
    assert set(report["ratios"]) == {"fewer_decoder_calls", "batch1_latency", "batch1_decoder_latency", "throughput"}
    assert all(m["batch1_encoder_p50_ms"] > 0 for m in report["modes"].values())
    printed = capsys.readouterr().out
    assert "encoder p50" in printed.splitlines()[0] and "identical outputs: 4 of 4" in printed


def test_bench_drafts_needs_a_ragged_bundle(bundles, tmp_path, capsys):
    data = tmp_path / "requests.jsonl"
    data.write_text('{"source": "a b", "candidates": ["a b"]}\n')
    assert main(["bench", "--drafts", "--bundle", str(bundles["bart"]), "--data", str(data)]) == 2
    assert "cannot verify drafts" in capsys.readouterr().err


def test_bench_drafts_refuses_a_request_the_model_cannot_read_by_its_line(bundles, tmp_path, capsys):
    data = tmp_path / "requests.jsonl"
    data.write_text('{"source": "a b", "candidates": ["a b"]}\n\n' + json.dumps({"source": "a " * 3000, "candidates": ["a"]}))
    assert main(["bench", "--drafts", "--bundle", str(bundles["t5"]), "--data", str(data), "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}: line 3: the source and template" in err[0]


def test_ray_bench_refuses_a_request_the_default_corrector_cannot_read_by_its_line(tmp_path):
    """`python -m lmcor.bench.ray` checks its requests before it starts a cluster."""
    from lmcor.bench.ray import RayBenchConfig, _jsonl
    from lmcor.runtime.corrector import Corrector
    from lmcor.runtime.errors import InputError

    data = tmp_path / "requests.jsonl"
    data.write_text('{"source": "a b", "candidates": ["a b"]}\n\n' + json.dumps({"source": "a " * 3000, "candidates": ["a"]}))
    with pytest.raises(InputError, match=f"{data}: line 3: the source and template"):
        _jsonl(RayBenchConfig(data=data, requests=2), tmp_path, Corrector.load())


def test_ray_bench_stops_the_lmcor_server_it_started(tmp_path, monkeypatch):
    """The plain server of `python -m lmcor.bench.ray` is stopped after its load point (its stop
    failed on one process where it takes a list, and left the server running). Answers it has no
    expected output for count as differing, and their clients go on (each client's thread died on its
    first answer)."""
    from lmcor.bench import ray as ray_bench
    from lmcor.bench import serve as serve_bench
    from lmcor.runtime.corrector import Corrector

    started = []
    start = serve_bench._start
    monkeypatch.setattr(serve_bench, "_start", lambda *a: started.append(start(*a)) or started[-1])
    monkeypatch.setattr(ray_bench, "SIZES", ())  # the Ray Serve points: test_ray.py's
    config = ray_bench.RayBenchConfig(requests=8, seconds=1.0, clients=2, batch_size=4)
    _, bodies = ray_bench._jsonl(config, tmp_path, Corrector.load())
    runs = ray_bench._serving(config, bodies, {}, tmp_path)
    assert list(runs) == ["lmcor serve"] and started[0][0].poll() == 0  # drained and exited
    load = runs["lmcor serve"]
    assert load["latencies"] and load["identical_outputs"] == 0 and load["lost"] == 0


@pytest.mark.parametrize("args, said", [(["--serve", "--seconds", "-1"], "--seconds: must be a number of seconds above 0"),
                                        (["--serve", "--clients", "1,100000"], "--clients: must be integers from 1 to 1024"),
                                        (["--gate", "--gate-threshold", "nan"], "--gate-threshold: must be a finite number")])
def test_load_settings_that_measure_nothing_are_refused(args, said, capsys):
    try:
        code = main(["bench", *args])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("args, said", [
    (["--drafts", "--host"], "--drafts and --host are separate runs: give one"),
    (["--drafts", "--gate-threshold", "0.9"], "--gate-threshold goes with --gate"),
    (["--host", "--seconds", "3"], "--seconds goes with --serve"),
    (["--bundle", "somewhere"], "--bundle goes with a mode that runs instead"),
    (["--drafts", "--model", "somewhere"], "--model goes with the peer comparison or --candidates"),
    (["--model", "no-such-folder"], "--model no-such-folder: no such folder (a Hugging Face checkpoint folder: nothing is downloaded)"),
    (["--backends", ""], "--backends is empty"),
    (["--model", ""], "--model is empty: give a path"),  # was the random flan-t5-small, without a word
    (["--host", "--data", " "], "--data is empty: give a path"),
    (["--drafts", "--bundle", ""], "--bundle is empty: give a path"),
    (["--drafts", "--sweeps"], "--sweeps goes with the peer comparison (no mode flag), not --drafts"),
    (["--host", "--k", "9"], "--k goes with the peer comparison (no mode flag), not --host"),
    (["--shared-prefix", "--data", "x.jsonl"], "--shared-prefix does not read --data"),
    (["--serve", "--rounds", "5"], "--serve does not read --rounds"),
    (["--drafts", "--prefix-tokens", "10"], "--prefix-tokens goes with --shared-prefix"),
    (["--shape", "tiny", "--data", "no-such.jsonl"], "--data no-such.jsonl: no such file"),
    (["--serve", "--clients", ""], "--clients: must be integers from 1 to"),
    (["--data", EXAMPLES], "--data goes with --model"),  # the random shapes read no text
    (["--model", ".", "--data", EXAMPLES, "--k", "3"], "--k shapes random requests"),
    (["--model", ".", "--data", EXAMPLES, "--natural", "--new-tokens", "16"], "--new-tokens with --data --natural"),
    (["--model", ".", "--shape", "tiny"], "--shape sizes a random-init model: --model is the model"),
])
def test_flags_that_cannot_apply_are_refused_before_any_work(args, said, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0]


def test_an_out_that_cannot_be_a_folder_is_refused_first(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["bench", "--drafts", "--data", str(tmp_path / "none.jsonl"), "--out", str(taken / "sub")]) == 2
    assert f"--out {taken / 'sub'}: not a folder that can be made or written ({taken} is a file)" in capsys.readouterr().err


def test_text_workloads_name_the_line_and_a_shape_checkpoint_cut_short_is_built_again(bundles, tmp_path):
    from lmcor.bench.workloads import shape_checkpoint, text_workload
    from lmcor.runtime.errors import InputError

    data = tmp_path / "bad.jsonl"
    data.write_text('{"source": "a", "candidates": ["b"]}\n{bad\n')
    with pytest.raises(InputError, match=f"{data}: line 2: "):
        text_workload(data, bundles["t5"], 8)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="no requests"):
        text_workload(tmp_path / "empty.jsonl", bundles["t5"], 8)
    long = tmp_path / "long.jsonl"  # a blank line first: the error names the file's line, not the request's number
    long.write_text('\n{"source": "a", "candidates": ["b"]}\n' + json.dumps({"source": "word " * 2000, "candidates": ["b"]}) + "\n")
    with pytest.raises(InputError, match=f"{long}: line 3: the source and template"):
        text_workload(long, bundles["t5"], 8)
    cut = tmp_path / "hf"
    cut.mkdir()
    (cut / "config.json").write_text("{}")  # where a Ctrl-C left the folder
    shape_checkpoint("tiny", cut)
    assert (cut / "tokenizer.json").is_file() and (cut / "model.safetensors").is_file()


def test_the_machine_peak_kept_is_the_best_reading_of_each_measure():
    from lmcor.bench.harness import best_peak

    assert best_peak({"gemm_gflops": 240.0, "copy_gbps": 14.5}, {"gemm_gflops": 370.0, "copy_gbps": 12.0}) == {
        "gemm_gflops": 370.0, "copy_gbps": 14.5}


def test_bench_request_files_are_read_as_lmcor_reads_its_input(tmp_path):
    """A BOM is no error, and a bad line is named by its line (a UnicodeDecodeError or a bare
    JSONDecodeError, with no file or line)."""
    from lmcor.bench.candidates import _sources
    from lmcor.bench.drafts import _numbered_requests
    from lmcor.runtime.errors import InputError

    good = json.dumps({"source": "she go home", "candidates": ["She goes home."]}).encode()
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n\n" + good + b"\n")
    assert [n for n, _ in _numbered_requests(path, 5)] == [1, 3]
    assert _sources(path, 5) == ["she go home", "she go home"]
    for bad, said in ((b'{"source": "caf\xe9"}', "line 2: not valid UTF-8"), (b"{bad", "line 2: not valid JSON")):
        path.write_bytes(good + b"\n" + bad + b"\n")
        for read in (_numbered_requests, _sources):
            with pytest.raises(InputError, match=f"{path}: {said}"):
                read(path, 5)


def test_stopping_the_servers_leaves_none_running(monkeypatch):
    """Each gets SIGTERM at once; one that ignores it is killed; a second signal while waiting (Ctrl-C)
    still leaves none running."""
    import subprocess
    import sys

    from lmcor.bench import serve

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"

    def started():
        processes = [subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE) for _ in range(2)]
        for process in processes:
            process.stdout.readline()  # its handler is set
        return processes

    monkeypatch.setattr(serve, "START_TIMEOUT_S", 0.5)
    processes = started()
    assert serve._stop(processes) == [-9, -9]
    processes = started()

    def interrupted(timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(processes[0], "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve._stop(processes)
    assert [subprocess.Popen.wait(p, timeout=10) for p in processes] == [-9, -9]  # (its own wait, not the stub)


def test_serve_clients_count_answers_that_are_not_the_expected_output_and_go_on():
    """A 200 whose body is not the expected output of the request sent (not JSON, a list, another
    request's id or an id of another type, an unhashable id, no output) differs; its client goes on
    (it died on the first such answer). The stub server answers in turn from `replies`."""
    import http.server
    import itertools

    from lmcor.bench import serve

    replies = [b"not json", b"[1]", b'{"id": 1, "output": "right"}', b'{"id": 0.0, "output": "right"}',
               b'{"id": [0], "output": "right"}', b'{"id": 0}', b'{"id": 0, "output": "wrong"}',
               b'{"id": 0, "output": "right"}', b"[" * 100_000]
    turn = itertools.count()

    class Stub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = replies[next(turn) % len(replies)]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = serve._drive(f"http://127.0.0.1:{server.server_port}", [b'{"id": 0}'], {0: "right", 1: "right"}, 2,
                           0.0, min_requests=4 * len(replies))
    finally:
        server.shutdown()
        server.server_close()
    assert len(run["latencies"]) == 4 * len(replies) and run["lost"] == 0 and not run["errors"]
    assert run["identical_outputs"] == 4  # the one right answer, each time round


def test_serve_clients_stop_once_the_server_has_ended():
    """A server that died mid-point: each client counts its refused request and stops (they spun on
    refused connections, counting tens of thousands lost, until the point's time was up)."""
    import socket
    import subprocess
    import sys
    import time

    from lmcor.bench import serve

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    started = time.monotonic()
    run = serve._drive(f"http://127.0.0.1:{port}", [b"{}"], {}, 2, 30.0, server=ended)
    assert run["lost"] == 2 and not run["latencies"] and time.monotonic() - started < 10


def test_the_serve_table_says_when_a_target_over_one_at_a_time_is_above_offline_itself():
    from lmcor.bench import serve

    def point(rps: float) -> dict:
        return {"answered": 10, "requests_per_s": rps, "p50_ms": 10.0, "p90_ms": 12.0, "p99_ms": 20.0, "errors": {},
                "lost": 0, "identical_outputs": 10, "client_cpu_share": 0.05}

    def report(offline: float) -> dict:
        servers = {name: {"max_batch": batch, "batches": 1, "exit_code": 0, "ended_mid_run": False,
                          "clients": {"16": point(rps)}}
                   for name, batch, rps in (("server", 16, 200.0), ("server, one at a time", 1, 150.0))}
        return {"data": "x.jsonl", "requests": 8, "seconds": 1.0, "threads": None,
                "machine": {"cpu": "cpu", "cores": 2}, "servers": servers,
                "offline": {"batch_size": 16, "requests_per_s": offline},
                "in_process_single": {"p50_ms": 5.0, "p99_ms": 9.0},
                "ratios": {"throughput_vs_one_at_a_time": 200.0 / 150.0}}

    said = "2x the one-at-a-time server (300.0 req/s) is above offline correct_batch itself (250.0) on this machine"
    assert said in serve.table(report(250.0))
    assert "is above offline" not in serve.table(report(320.0))
