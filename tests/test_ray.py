"""lmcor on Ray (`lmcor.integrations.ray`), on a local two-CPU cluster on loopback started and stopped
here: `lmcor correct --ray` writes the very file `lmcor correct` writes (bad lines' error records and
line numbers included) and resumes an interrupted one; a worker that dies mid-job is restarted by Ray
and no line is lost or written twice; a Ray Serve replica answers the HTTP API as `lmcor serve` does."""

import json
import os
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_requests

ray = pytest.importorskip("ray", reason="needs the ray extra (pip install 'lmcor[ray]')")
from lmcor.integrations import ray as lmcor_ray  # noqa: E402  (a failure of lmcor's own is a failure, not a skip)

import httpx

from lmcor import Corrector, InputError
from lmcor.cli import main
from lmcor.server.config import ServeConfig
from lmcor.server.runner import running

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "requests.jsonl"
TIMEOUT = 60  # seconds: a client fails instead of hanging
# Small decoder batches, so the job has several blocks (8 lines each) for the two workers.
CORRECT = ["-q", "--batch-size", "1", "--max-new-tokens", "24"]
BAD = {  # line -> the input line, a bad one; the rest are requests
    3: b"{broken",
    5: b"",
    9: b'["she go", ["She goes."]]',
    14: b'{"source": "x", "candidates": "abc"}',
    20: b'{"id": "\\ud800", "source": "x", "candidates": ["a"]}',
    26: b'{"source": "caf\xe9", "candidates": ["a"]}',
    31: b'{"source": "' + b"a" * 3000 + b'", "candidates": ["a"]}',
}


def test_auto_with_no_cluster_running_names_the_flag(tmp_path):
    """`--ray-address auto` and no cluster (none in an empty Ray folder; first in this module, before
    its tests' cluster starts, and in a process of its own): the flag named, not Ray's `--address`."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "lmcor.cli", "correct", "--ray", str(EXAMPLES), "--ray-address", "auto",
                          "-q"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": ""})
    assert run.returncode == 2 and "Ray address 'auto' (--ray-address or RAY_ADDRESS)" in run.stderr, run.stderr


def test_a_cluster_started_here_keeps_stdout_and_sigterm_lmcors():
    """Ray's driver prints its workers' failures to sys.stdout, where `lmcor correct` writes records
    and `lmcor serve` its address: while lmcor's own cluster runs, prints go to stderr. `ray.init`
    puts in a SIGTERM handler of its own (exit 15): lmcor's is back once it returns (exit 143)."""
    import subprocess
    import sys

    code = ("import signal, sys\n"
            "import ray\n"
            "from lmcor.integrations import ray as lmcor_ray\n"
            # Ray's printing thread runs until `ray.shutdown` stops it (killed workers are said then)
            "stop = ray.shutdown\n"
            "ray.shutdown = lambda: (print('printed at shutdown'), stop())\n"
            "with lmcor_ray.cluster():\n"
            "    print('printed inside')\n"
            "    print(signal.getsignal(signal.SIGTERM).__name__, file=sys.__stdout__)\n"
            "print('printed after')\n"
            "sys.stdout = None\n"  # closed: it stays closed (records are not written to stderr instead)
            "with lmcor_ray.cluster():\n"
            "    print(sys.stdout, file=sys.__stdout__)\n")
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as short:  # Ray's socket paths are limited to 107 bytes
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAY_TMPDIR": short, "RAY_ADDRESS": ""})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["_terminated", "printed after", "None"]
    assert "printed inside" in run.stderr and "printed at shutdown" in run.stderr


def test_served_bundles_are_named_by_absolute_paths(tmp_path, monkeypatch):
    """Ray's replicas run in the folder the cluster started in: a relative --model, --gate,
    --classifier or --generator would name another folder there, or none."""
    monkeypatch.chdir(tmp_path)
    config = lmcor_ray.absolute_paths(ServeConfig(model="m", gate="g", classifiers={"c": "sub/c"},
                                                  generators={"x": "x"}))
    assert (config.model, config.gate) == (str(tmp_path / "m"), str(tmp_path / "g"))
    assert config.classifiers == {"c": str(tmp_path / "sub/c")} and config.generators == {"x": str(tmp_path / "x")}
    shipped = lmcor_ray.absolute_paths(ServeConfig(gate=""))  # the shipped corrector and gate stay as they are
    assert (shipped.model, shipped.gate) == (None, "")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    """The shipped examples, generated requests and bad lines: 40 lines, the last without its newline."""
    good = [line.encode() for line in EXAMPLES.read_text(encoding="utf-8").splitlines()]
    good += [json.dumps(r).encode() for r in make_requests(40 - len(good) - len(BAD), seed=19)]
    lines = [BAD[n] if n in BAD else good.pop(0) for n in range(1, 41)]
    path = tmp_path_factory.mktemp("ray") / "in.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path


@pytest.fixture(scope="module")
def plain(jsonl, tmp_path_factory) -> Path:
    """What `lmcor correct` writes."""
    out = tmp_path_factory.mktemp("plain") / "out.jsonl"
    assert main(["correct", str(jsonl), "-o", str(out), "--max-line-bytes", "2048", *CORRECT]) == 1
    return out


def _bad_lines(path: Path) -> list[int]:
    return [r["line"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "error" in r]


def test_correct_on_ray_writes_what_lmcor_correct_writes(cluster, jsonl, plain, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    code = main(["correct", "--ray", str(jsonl), "-o", str(out), "--max-line-bytes", "2048", "--workers", "2",
                 "--threads", "1", *CORRECT])
    assert code == 1  # some lines failed, every other was answered
    assert out.read_bytes() == plain.read_bytes()
    assert _bad_lines(out) == sorted(n for n in BAD if BAD[n])  # a blank line is no request, and no record
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"lmcor: {jsonl}: line ")]
    assert [int(line.split()[3].rstrip(":")) for line in said] == _bad_lines(out)
    assert not list(tmp_path.glob(".out.jsonl.*"))  # the temporary file was renamed over -o


def test_resume_answers_only_the_lines_after_the_complete_records(cluster, jsonl, plain, tmp_path):
    records = plain.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(records[:17]) + records[17][:10])  # 17 complete records, then a torn one
    code = main(["correct", "--ray", str(jsonl), "-o", str(out), "--resume", "--max-line-bytes", "2048",
                 "--workers", "1", "--threads", "1", *CORRECT])
    assert code == 1 and out.read_bytes() == plain.read_bytes()


def test_resume_refuses_another_inputs_output(cluster, jsonl, plain, tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_bytes(b"".join(jsonl.read_bytes().splitlines(keepends=True)[:5]))
    out = tmp_path / "out.jsonl"
    out.write_bytes(plain.read_bytes())
    capsys.readouterr()
    assert main(["correct", "--ray", str(short), "-o", str(out), "--resume", "--workers", "1", "--threads", "1",
                 *CORRECT]) == 2
    assert "answers input lines up to 40, but" in capsys.readouterr().err
    assert out.read_bytes() == plain.read_bytes()


def test_correct_dataset_refuses_what_its_workers_would_before_they_start(cluster, jsonl, tmp_path):
    texts = ray.data.from_items([{"line": 1, "size": 10, "raw": '{"source": "a", "candidates": ["b"]}'}])
    lines = lmcor_ray.read_jsonl(jsonl)
    unlabelled = tmp_path / "gate"  # a classifier with no "right" label: no gate
    shutil.copytree(lmcor_ray.shipped_bundle("gate"), unlabelled)
    manifest = json.loads((unlabelled / "lmcor.json").read_text())
    (unlabelled / "lmcor.json").write_text(json.dumps({**manifest, "labels": ["neg", "pos"]}))
    for dataset, settings, message in [
            (texts, {}, r"rows must be \{line: int64, size: int64, raw: binary, limit: int64\}.*raw: string"),
            (ray.data.from_items([{"line": 1}]), {}, "rows must be"),
            (lines, {"workers": 0}, "workers must be an integer >= 1"),
            (lines, {"lines_per_batch": 0}, "lines_per_batch must be"),
            (lines, {"threads": 0}, "threads must be"),
            (lines, {"workers": 3}, r"3 workers of 1 CPU\(s\) each need 3 CPUs; the Ray cluster has 2: lower their "
                                    "number or threads"),  # Ray would wait for a third CPU for ever
            (lines, {"threads": 4}, "fit on no node"),
            (lines, {"batch_size": 0}, "batch_size must be"),
            (lines, {"options": {"max_new_tokens": 5}}, "options must be a CorrectionOptions"),
            (lines, {"options": lmcor_ray.CorrectionOptions(max_new_tokens=500)}, "max_new_tokens must be"),
            (lines, {"options": lmcor_ray.CorrectionOptions(min_new_tokens=500)}, "min_new_tokens must be"),
            (lines, {"options": lmcor_ray.CorrectionOptions(fallback_span=2, fallback_below=0)},
             "fallback_span must come with the fallback"),  # as each worker's correct_batch would refuse them
            (lines, {"options": lmcor_ray.CorrectionOptions(gate_threshold=0.5)}, "gate_threshold needs a gate"),
            (lines, {"model": "/nonexistent"}, "/nonexistent"),
            (lines, {"gate": str(unlabelled)}, "the gate must have a 'right' label"),
            (lines, {"providers": "CPUExecutionProvider"}, "providers must be a list"),
            (lines, {"providers": ["Foo"]}, "'Foo' is not an ONNX Runtime execution provider"),
            (lines, {"max_line_bytes": 2048}, "'max_line_bytes' is not a setting of CorrectLines")]:
        with pytest.raises(lmcor_ray.LmcorError, match=message):  # InputError; a missing bundle's BundleError
            lmcor_ray.correct_dataset(dataset, **settings)

    class Tagged(lmcor_ray.CorrectLines):  # a worker with a setting of its own
        def __init__(self, *, tag: str, **settings):
            super().__init__(**settings)
            self.tag = tag

    lmcor_ray.correct_dataset(lines, worker=Tagged, tag="x")  # checked, not run
    assert lmcor_ray.correct_dataset(ray.data.from_items([]), workers=1).take_all() == []
    # The caller's dataset keeps its own execution options (Ray Data's children share their parent's).
    assert not lines.context.execution_options.preserve_order and lines.context.enable_progress_bars


def test_a_worker_killed_mid_job_is_restarted_without_losing_or_repeating_lines(cluster, jsonl, plain, tmp_path):
    marker = tmp_path / "killed"

    class DiesOnce(lmcor_ray.CorrectLines):
        """Kills its own process on its second batch, once in the whole job (the marker says)."""

        calls = 0

        def __call__(self, batch):
            DiesOnce.calls += 1
            if DiesOnce.calls == 2 and not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    source = lmcor_ray.JsonlLines(jsonl, lines_per_block=4, max_line_bytes=2048)
    answers = [a for chunk, _ in lmcor_ray.answers(source, lambda: False, worker=DiesOnce, workers=2, threads=1,
                                                    lines_per_batch=4, batch_size=1,
                                                    options=lmcor_ray.CorrectionOptions(max_new_tokens=24))
               for a in chunk]
    assert marker.exists(), "a worker should have died"
    assert [a.number for a in answers] == sorted({a.number for a in answers})  # in order, each line once
    assert "".join(a.text for a in answers).encode() == plain.read_bytes()


def test_a_batch_that_kills_every_worker_fails_the_job_after_a_few_restarts(cluster, jsonl, tmp_path):
    """A worker that dies on the same batch each time (a crash, an out-of-memory kill) is restarted a
    few times, then the job fails with Ray's error in one line (Ray's default retries for ever)."""

    class DiesOnLine5(lmcor_ray.CorrectLines):
        def __call__(self, batch):
            if 5 in batch["line"].to_pylist():
                os._exit(1)
            return super().__call__(batch)

    source = lmcor_ray.JsonlLines(jsonl, lines_per_block=4, max_line_bytes=2048)
    with pytest.raises(lmcor_ray.LmcorError, match="^a Ray worker failed: "):
        for _ in lmcor_ray.answers(source, lambda: False, worker=DiesOnLine5, workers=1, threads=1, lines_per_batch=4,
                                   batch_size=1, options=lmcor_ray.CorrectionOptions(max_new_tokens=24)):
            pass


def test_a_worker_that_cannot_start_says_why_in_one_line(cluster, jsonl, tmp_path, capsys):
    """A bundle whose tokenizer fails its checksum on the workers: the worker's own error, not Ray's
    wrapping of it (an actor that died in its constructor) with its traceback."""
    tampered = tmp_path / "tampered"
    shutil.copytree(lmcor_ray.shipped_bundle("default"), tampered)
    tokenizer = tampered / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:-2] + b" }")
    capsys.readouterr()
    assert main(["correct", "--ray", str(jsonl), "-o", str(tmp_path / "out.jsonl"), "--model", str(tampered),
                 "--workers", "1", "--threads", "1", *CORRECT]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmcor: error:")]
    assert len(said) == 1 and "tokenizer.json: checksum mismatch" in said[0], said
    assert not (tmp_path / "out.jsonl").exists()

    class Refuses(lmcor_ray.CorrectLines):  # an error of a worker's call, which Ray Data wraps as text
        def __call__(self, batch):
            raise InputError("no, not this batch")

    with pytest.raises(InputError, match="^no, not this batch$"):
        next(lmcor_ray.answers(lmcor_ray.JsonlLines(jsonl), lambda: False, worker=Refuses, threads=1))

    class Breaks(lmcor_ray.CorrectLines):  # not lmcor's: said by the exception at the root of Ray's chain
        def __call__(self, batch):
            raise RuntimeError("boom on purpose")

    with pytest.raises(lmcor_ray.LmcorError, match="a Ray worker failed: .*RuntimeError: boom on purpose$"):
        next(lmcor_ray.answers(lmcor_ray.JsonlLines(jsonl), lambda: False, worker=Breaks, threads=1))


def test_the_line_limit_is_the_readers(cluster, jsonl, plain, monkeypatch):
    """`read_jsonl`'s max_line_bytes is the one a line is refused by, and named in its record; a bundle's
    path is read from the caller's folder, whatever the workers' is."""
    from lmcor.runtime.bundle import shipped_bundle

    monkeypatch.chdir(shipped_bundle("default").parent)
    answered = lmcor_ray.correct_dataset(lmcor_ray.read_jsonl(jsonl, max_line_bytes=2048), threads=1, batch_size=1,
                                         model="default",
                                         options=lmcor_ray.CorrectionOptions(max_new_tokens=24)).take_all()
    long = next(row for row in answered if row["line"] == 31)
    assert "over the limit of 2048" in long["error"]
    assert long["record"] == next(line + "\n" for line in plain.read_text().splitlines() if '"line": 31,' in line)


def test_bad_flags_fail_in_one_line(tmp_path, capsys):
    assert main(["correct", str(EXAMPLES), "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert main(["correct", "--ray", "-"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert main(["correct", "--ray", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory, not a JSONL file" in capsys.readouterr().err
    assert main(["correct", "--ray", str(EXAMPLES), "--model", ""]) == 2  # not this folder
    assert "a bundle's path is empty" in capsys.readouterr().err
    assert main(["serve", "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address, said in ((f"127.0.0.1:{port}", f"no Ray cluster answers at 127.0.0.1:{port}"),
                          (f"ray://127.0.0.1:{port}", "no Ray cluster answers"),
                          ("somewhere", "Ray address 'somewhere' .--ray-address. is not host:port"),
                          ("http://127.0.0.1:8265", "is not host:port")):
        with pytest.raises(InputError, match=said):  # at once: Ray would wait minutes before failing
            lmcor_ray._check_reachable(address)
    with pytest.raises(InputError, match="somewhere' .RAY_ADDRESS. is not host:port"):
        lmcor_ray._check_reachable("somewhere", "RAY_ADDRESS")
    with socket.socket() as web:  # answers, but not as Ray (a dashboard's port): refused at once too
        web.bind(("127.0.0.1", 0))
        web.listen()

        def answer_text():
            connection, _ = web.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        with ThreadPoolExecutor(1) as pool:
            pool.submit(answer_text)
            with pytest.raises(InputError, match="answers, but not as a Ray cluster does"):
                lmcor_ray._check_reachable(f"127.0.0.1:{web.getsockname()[1]}")
    with socket.socket() as taken:  # Serve said only that its proxy actor failed, in terminal colours
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(lmcor_ray.LmcorError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}: "):
            lmcor_ray._check_port("127.0.0.1", taken.getsockname()[1])


def _exchange(url: str, requests: list[dict]) -> list[tuple[int, object]]:
    calls = [("POST", "/v1/correct", requests[0]), ("POST", "/v1/correct", requests[:4]),
             ("POST", "/v1/correct", {"source": "x", "candidates": ["a"], "num_beams": 0}),
             ("POST", "/v1/correct", [requests[0], {"candidates": ["a"]}]), ("POST", "/v1/correct", b"{bad"),
             ("POST", "/v1/classify", {"text": "x"}), ("GET", "/nowhere", None), ("GET", "/health", None)]
    out = []
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for method, path, body in calls:
            response = client.request(method, path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
            out.append((response.status_code, response.json()))
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/correct", "/health"}
    return out


def test_a_serve_replica_answers_like_lmcor_serve(cluster):
    requests = make_requests(12, seed=21)
    config = ServeConfig(port=0, timeout_s=30, threads=1)
    with running(config) as server:
        expected = _exchange(server.url, requests)
    with lmcor_ray.running(config) as url:
        assert _exchange(url, requests) == expected
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client, ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda r: client.post("/v1/correct", json=r), requests))
    assert [a.status_code for a in answers] == [200] * len(requests)
    assert [a.json()["output"] for a in answers] == [c.text for c in Corrector.load().correct_batch(requests)]


def test_a_second_server_on_the_cluster_is_refused_and_serves_queue_bounded(cluster):
    """A second `lmcor serve --ray` would have replaced the first's deployment, then deleted it; and
    Serve's own queue is bounded as `lmcor serve`'s is: past it, 429 (it held every request)."""
    requests = make_requests(12, seed=22)
    with lmcor_ray.running(ServeConfig(port=0, timeout_s=30, threads=1, max_queue=1, max_batch=1)) as url:
        with pytest.raises(lmcor_ray.LmcorError, match="already runs on this Ray cluster"):
            with lmcor_ray.running(ServeConfig(port=0, threads=1, api_key="another")):
                pass
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client, ThreadPoolExecutor(12) as pool:
            codes = sorted(a.status_code for a in pool.map(lambda r: client.post("/v1/correct", json=r), requests))
            assert client.post("/v1/correct", json=requests[0]).status_code == 200  # the first one still serves
    assert set(codes) == {200, 429}, codes  # one taken, one waiting, the others refused (it took all 12)


def test_serve_running_on_every_interface_is_not_served_without_a_key(cluster):
    """Where Serve already runs, its proxies keep their own host (`serve.start` only warns): one that
    other machines reach needs a key, whatever host was asked for."""
    from ray import serve

    serve.start(http_options={"host": "0.0.0.0", "port": lmcor_ray._free_port("0.0.0.0")})
    try:
        with pytest.raises(InputError, match="host '0.0.0.0' is reachable from other machines"):
            with lmcor_ray.running(ServeConfig(port=0, threads=1)):
                pass
    finally:
        serve.shutdown()


def test_a_clusters_own_address_is_taken(cluster):
    lmcor_ray._check_reachable(ray.get_runtime_context().gcs_address)  # its GCS speaks gRPC


def test_a_worker_larger_than_every_node_is_refused(cluster):
    with pytest.raises(InputError, match="fit on no node of the Ray cluster"):
        lmcor_ray._check_cpus(1, 3, "workers")
    assert lmcor_ray.default_threads(1) == 2 and lmcor_ray.default_threads(4) == 1  # the cluster's, not the machine's


def test_serve_run_builder_reads_its_arguments_as_text():
    app = lmcor_ray.build({"replicas": "1", "max_replicas": "2", "max_batch": "8", "batches": "2", "threads": "1"})
    assert type(app).__name__ == "Application"
    with pytest.raises(lmcor_ray.InputError, match="below --replicas"):
        lmcor_ray.build({"replicas": "2", "max_replicas": "1"})
    for args, message in [({"modle": "x"}, "unknown key 'modle'"), ({"replicas": "abc"}, "replicas must be an integer"),
                          ({"replicas": "0"}, "replicas must be an integer >= 1"),
                          ({"replicas": 1.5}, "replicas must be an integer"),
                          ({"insecure": "maybe"}, "insecure must be true or false"),
                          ({"providers": "CPUExecutionProvider"}, "providers must be a list")]:
        with pytest.raises(lmcor_ray.InputError, match=message):
            lmcor_ray.build(args)
