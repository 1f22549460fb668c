"""`lmcor serve`: real servers on free loopback ports. Concurrent clients get what `correct_batch`
gives; every error path answers its status (never a 5xx from user input, fuzzed from /openapi.json);
a full queue, a deadline, a missing key and a drain each answer as documented; SIGTERM finishes
what is in flight and exits 0; /metrics parses and counts."""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import make_requests
from lmcor.runtime.bundle import shipped_bundle
from prometheus_client.parser import text_string_to_metric_families

from lmcor import Classifier, Corrector, Generator, InputError
from lmcor.server.config import ServeConfig
from lmcor.server.runner import running

TIMEOUT = 60  # seconds: a client fails instead of hanging
DECODE = {"max_new_tokens": 32}
KEY = "s3cret-key"
ARCH = "t5v11"  # its tiny random model writes outputs of many lengths


@pytest.fixture(scope="module")
def server(bundles, gpt2_bundle):
    config = ServeConfig(model=str(bundles[ARCH]), port=0, classifiers={"gate": str(shipped_bundle("gate"))},
                         generators={"tiny": str(gpt2_bundle)}, timeout_s=30)
    with running(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def _slow(corrector_bundle, n: int = 0) -> dict:
    """A request forced to decode the bundle's whole max_output_tokens, one token per decoder call."""
    cap = Corrector.load(corrector_bundle).manifest.max_output_tokens
    return {"id": f"slow-{n}", "source": "she go home", "candidates": ["She goes home."], "max_new_tokens": cap,
            "min_new_tokens": cap, "drafts": False, "no_repeat_ngram_size": 0, "fallback_below": 0}


def _metrics(client: httpx.Client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_concurrent_clients_get_the_outputs_of_correct_batch(client, bundles):
    requests = make_requests(24, seed=11)
    expected = Corrector.load(bundles[ARCH]).correct_batch(requests, **DECODE)  # drafts on, as on the server
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: client.post("/v1/correct", json={**r, **DECODE}), requests))
    assert [a.status_code for a in answers] == [200] * len(requests)
    records = [a.json() for a in answers]
    assert [r["output"] for r in records] == [c.text for c in expected]
    assert [r["output_tokens"] for r in records] == [c.stats.output_tokens for c in expected]
    assert [r["id"] for r in records] == [r["id"] for r in requests]
    assert len({r["output_tokens"] for r in records}) > 2, "the fixture should give outputs of several lengths"


def test_a_list_is_answered_in_order_and_streams_tokens_and_results(client, bundles):
    requests = make_requests(5, seed=12)
    expected = [c.text for c in Corrector.load(bundles[ARCH]).correct_batch(requests, **DECODE)]
    listed = client.post("/v1/correct", json=[{**r, **DECODE} for r in requests])
    assert listed.status_code == 200 and [r["output"] for r in listed.json()] == expected
    streamed = client.post("/v1/correct", json=[{**r, **DECODE, "stream": True} for r in requests])
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in streamed.text.strip().split("\n\n")]
    results = [data for name, data in events if name == "result"]
    assert events[-1][0] == "done" and len(results) == 5 and {name for name, _ in events} <= {"token", "result", "done"}
    assert sorted((data["index"], data["output"]) for data in results) == list(enumerate(expected))
    # Each request's text as it was decoded, in pieces, before its result (this bundle has no fallback).
    for n, text in enumerate(expected):
        pieces = [(i, data["text"]) for i, (name, data) in enumerate(events) if name == "token" and data["index"] == n]
        ends = [i for i, (name, data) in enumerate(events) if name == "result" and data["index"] == n]
        assert "".join(piece for _, piece in pieces) == text
        assert all(i < ends[0] for i, _ in pieces)
    assert sum(name == "token" for name, _ in events) > 5  # several pieces per request


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"id": ' + b"9" * 5000 + b', "source": "x", "candidates": ["a"]}', 400, "a number with more than 4300 digits"),
    (b'{"source": NaN, "candidates": ["a"]}', 422, "field 'source' is NaN, Infinity or a number out of range"),
    (b'{"source": "x", "candidates": ["a"], "source": "y"}', 422, "field 'source' appears twice"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),  # nested past Python's recursion limit
    # nested less than Python's limit, more than lmcor's records are (writing the id back would recurse)
    (b'{"id": ' + b"[" * 960 + b"]" * 960 + b', "source": "x", "candidates": ["a"]}', 400, "nested deeper than 32"),
    ('{"source": "x", "candidates": ["a"]}'.encode("utf-16-le"), 400, "not valid JSON"),  # JSON on the wire is UTF-8
    (b'{"source": "caf\xe9", "candidates": ["a"]}', 400, "the body is not valid UTF-8 (byte 0xe9 at byte 16)"),
    (b" " * (ServeConfig().max_body_bytes + 1), 413, "over the limit"),
    (iter([b" " * 65536] * 17), 413, "over the limit"),  # chunked: no Content-Length to refuse it by
    (b"[]", 422, "empty list"),
    (b'"just a string"', 422, "got a string"),
    (b'{"candidates": ["a"]}', 422, "missing field 'source'"),
    (b'{"source": "", "candidates": ["a"]}', 422, "field 'source' is empty"),
    (b'{"source": "\\u2029 \\r", "candidates": ["a"]}', 422, "field 'source' is only white space: nothing to correct"),
    (b'{"source": "x", "candidates": []}', 422, "field 'candidates' is an empty list"),
    (b'{"source": "x", "candidates": ["a"], "max_new_tokens": 100000}', 422, "max_new_tokens must be an integer"),
    (b'{"source": "x", "candidates": ["a"], "num_beams": "3"}', 422, "num_beams must be an integer"),
    (b'{"source": "x", "candidates": ["a"], "max_new_tokens": 1e300}', 422, "got 1e+300"),
    (b'{"source": "x", "candidates": ["a"], "gate_threshold": 2}', 422, "gate_threshold must be a probability"),
    (b'{"source": "x", "candidates": ["a"], "gate_threshold": 0.5}', 422, "this server has no gate"),
    (b'{"source": "x", "candidates": ["a"], "timeout_s": 0}', 422, "timeout_s must be a number of seconds"),
    (b'{"source": "x", "candidates": ["a"], "beams": 2}', 422, "unknown field 'beams'"),
    (b'[{"source": "x", "candidates": ["a"], "stream": true}, {"source": "x", "candidates": ["a"]}]', 422,
     "field 'stream' must be the same"),
]


@pytest.mark.parametrize("body, status, says", BAD, ids=[f"{n}-{s}" for n, (_, s, _) in enumerate(BAD)])
def test_a_bad_request_gets_its_status_and_a_message_naming_the_cause(server, body, status, says):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:  # a refused body may close its connection
        answer = c.post("/v1/correct", content=body)
    assert answer.status_code == status
    assert says in answer.json()["error"]["message"]
    if status == 413:  # the rest of a refused body is not read: the connection goes with it
        assert answer.headers["connection"] == "close"


def test_a_lone_streamed_request_refused_as_it_is_admitted_gets_its_status(client):
    """Too long for the model (found when the engine tokenizes it): 422, as unstreamed, not a 200 with an
    error event; the stream starts with its first tokens."""
    for body in ({"source": "word " * 2000, "candidates": ["a"]}, {"source": "she go", "candidates": ["a"] * 600}):
        answer = client.post("/v1/correct", json={**body, "stream": True})
        assert answer.status_code == 422 and answer.json()["error"]["kind"] == "invalid"
        assert "input tokens" in answer.json()["error"]["message"]
    answer = client.post("/v1/correct", json={**make_requests(1, seed=4)[0], "stream": True})
    assert answer.status_code == 200 and answer.text.startswith("event: token")


def test_a_body_may_start_with_a_byte_order_mark(client):
    """As a JSONL file's first line may (RFC 8259 lets a parser ignore one)."""
    body = json.dumps(make_requests(1, seed=4)[0]).encode()
    plain, marked = (client.post("/v1/correct", content=b) for b in (body, b"\xef\xbb\xbf" + body))
    assert plain.status_code == marked.status_code == 200 and marked.json() == plain.json()


def test_a_field_given_twice_or_out_of_range_fails_its_item_alone(client, bundles):
    good = make_requests(2, seed=9)
    body = b"".join([b"[", json.dumps(good[0]).encode(),
                     b', {"id": "twice", "source": "x", "candidates": ["a"], "source": "y"}',
                     b', {"id": 1e400, "source": "x", "candidates": ["a"]}',
                     b', {"id": 7, "source": "x", "candidates": ["a", {"n": 1e400}]}',
                     b', {"id": 8, "\\ud800": 1, "source": "x", "candidates": ["a"]}, ', json.dumps(good[1]).encode(), b"]"])
    answer = client.post("/v1/correct", content=body)
    assert answer.status_code == 200
    records = answer.json()
    assert [r["id"] for r in records] == [good[0]["id"], "twice", None, 7, 8, good[1]["id"]]
    assert [r.get("error", {}).get("message") for r in records[1:5]] == [
        "item 1: field 'source' appears twice in one object",
        "item 2: field 'id' is NaN, Infinity or a number out of range, which strict JSON cannot hold",
        "item 3: field 'candidates[1].n' is NaN, Infinity or a number out of range, which strict JSON cannot hold",
        "item 4: a key of the request holds a lone surrogate (U+D800), which is not Unicode text"]
    expected = Corrector.load(bundles[ARCH]).correct_batch(good)
    assert [records[n]["output"] for n in (0, 5)] == [c.text for c in expected]
    # an item that gave `stream` twice fails alone: it does not choose how the list is answered
    mixed = b"".join([b"[", json.dumps(good[0]).encode(), b', {"stream": false, "stream": true, "source": "x"}]'])
    answer = client.post("/v1/correct", content=mixed)
    assert answer.status_code == 200 and answer.json()[1]["error"]["message"] == (
        "item 1: field 'stream' appears twice in one object")


def test_a_list_answers_its_bad_items_in_their_places_and_the_others(client, bundles):
    good = make_requests(3, seed=8)
    body = [good[0], {"id": "broken", "source": "x", "candidates": "a"}, good[1],
            {"id": "long", "source": "word " * 3000, "candidates": ["a"]},  # too long for the model: refused by the runtime
            {**_slow(bundles[ARCH]), "timeout_s": 0.001}, good[2], ["not an object"]]
    errors = _metrics(client)
    answer = client.post("/v1/correct", json=body)
    assert answer.status_code == 200
    records = answer.json()
    counted = _metrics(client)
    for kind, count in (("invalid", 3), ("timeout", 1)):
        key = ("lmcor_errors_total", (("kind", kind),))
        assert counted[key] - errors.get(key, 0) == count
    assert [r.get("error", {}).get("kind") for r in records] == [None, "invalid", None, "invalid", "timeout", None,
                                                                 "invalid"]
    assert [r["id"] for r in records] == [good[0]["id"], "broken", good[1]["id"], "long", "slow-0", good[2]["id"], None]
    assert records[1]["error"]["message"] == "item 1: field 'candidates' must be a list of strings, got a string"
    assert "item 3: " in records[3]["error"]["message"] and "item 4: no answer" in records[4]["error"]["message"]
    expected = Corrector.load(bundles[ARCH]).correct_batch(good)
    assert [records[n]["output"] for n in (0, 2, 5)] == [c.text for c in expected]
    streamed = client.post("/v1/correct", json=[{**good[0], "stream": True}, {"source": "x", "candidates": "a",
                                                                           "stream": True}])
    events = [block.split("\n")[0] for block in streamed.text.strip().split("\n\n")]
    assert streamed.status_code == 200 and "event: error" in events and events[-1] == "event: done"
    # whether to stream is every item's to say, a bad one's too
    mixed = client.post("/v1/correct", json=[{"source": "", "candidates": ["x"], "stream": True}, good[0]])
    assert mixed.status_code == 422 and "'stream' must be the same in every item" in mixed.json()["error"]["message"]
    classified = client.post("/v1/classify", json=[{"text": "a"}, {"text": ""}, {"txt": "a"}]).json()
    assert "label" in classified[0] and [r["error"]["kind"] for r in classified[1:]] == ["invalid", "invalid"]
    generated = client.post("/v1/generate", json=[{"prompt": "The", "max_new_tokens": 4}, {"prompt": "The",
                                                                                       "temperature": -1}]).json()
    assert "output" in generated[0] and "temperature" in generated[1]["error"]["message"]


def test_other_routes_errors(client):
    assert client.get("/nowhere").status_code == 404
    assert client.get("/v1/correct").status_code == 405
    wrong = client.post("/v1/classify", json={"model": "nope", "text": "a"})
    assert wrong.status_code == 422 and "field 'model'" in wrong.json()["error"]["message"]
    bad = client.post("/v1/generate", json={"prompt": "The", "temperature": -1})
    assert bad.status_code == 422 and "temperature" in bad.json()["error"]["message"]


def test_classify_and_generate_answer_as_their_runtimes(client, gpt2_bundle):
    items = [{"id": n, "text": t, "pair": "she go home | 2 of 4 agree"} for n, t in enumerate(["She goes home.", "x"])]
    expected = Classifier.load(shipped_bundle("gate")).classify_batch(items)
    got = client.post("/v1/classify", json=items)
    assert got.status_code == 200
    assert [r["label"] for r in got.json()] == [c.label for c in expected]
    assert got.json()[0]["probabilities"] == pytest.approx(expected[0].probabilities.tolist(), abs=1e-6)
    prompts = ["The cat", "She goes to school"]
    greedy = Generator.load(gpt2_bundle).generate_batch(prompts, max_new_tokens=8)
    with ThreadPoolExecutor(2) as pool:  # concurrent calls share the generator's batches
        answers = list(pool.map(lambda p: client.post("/v1/generate", json={"prompt": p, "max_new_tokens": 8}),
                                prompts))
    assert [a.json()["output"] for a in answers] == [g.text for g in greedy]
    # a seed samples as the Python API's does (and as `lmcor generate --seed` does a first line)
    sampled = client.post("/v1/generate", json={"prompt": "The cat", "max_new_tokens": 8, "temperature": 1.0, "seed": 5})
    assert sampled.json()["output"] == Generator.load(gpt2_bundle).generate("The cat", max_new_tokens=8, temperature=1.0,
                                                                             seed=5)
    blank = client.post("/v1/generate", json={"prompt": " \n", "max_new_tokens": 8})  # as `lmcor generate` reads it
    assert blank.status_code == 422 and "field 'prompt' must be a non-empty string" in blank.json()["error"]["message"]
    for body, said in (({"prompt": "The", "stop": None}, "stop must be a list (or other iterable) of strings, got null"),
                       ({"prompt": None}, "field 'prompt' must be a non-empty string, got null"),
                       ({"max_new_tokens": 8}, "missing field 'prompt'")):  # in JSON's words
        bad = client.post("/v1/generate", json=body)
        assert bad.status_code == 422 and said in bad.json()["error"]["message"]


def test_a_generate_group_that_fails_fails_alone(gpt2_bundle, monkeypatch):
    """Prompts that continue alike share a call; one group's failure is its prompts' answer, not the
    answer of every prompt the batcher took with them."""
    from lmcor.server.models import Prompt, _generate

    generator = Generator.load(gpt2_bundle)
    real = Generator.generate_batch

    def failing(self, prompts, **options):
        if options["temperature"]:
            raise RuntimeError("the sampled group failed")
        return real(self, prompts, **options)

    monkeypatch.setattr(Generator, "generate_batch", failing)
    got = _generate(generator, [Prompt("The cat", max_new_tokens=4), Prompt("The cat", max_new_tokens=4, temperature=1.0),
                                Prompt("She goes", max_new_tokens=4)])
    assert isinstance(got[1], RuntimeError)
    assert [g.text for g in (got[0], got[2])] == [g.text for g in real(generator, ["The cat", "She goes"],
                                                                       max_new_tokens=4)]


def test_a_full_queue_answers_429_with_retry_after(bundles):
    slow = _slow(bundles[ARCH])
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, max_queue=2, max_batch=1)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: c.post("/v1/correct", json={**slow, "id": n}), range(8)))
        too_many = c.post("/v1/correct", json=[slow] * 3)
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 429}, statuses
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 429)
    assert too_many.status_code == 413 and "--max-queue" in too_many.json()["error"]["message"]


def test_past_its_deadline_a_request_gets_504(client, bundles):
    late = client.post("/v1/correct", json={**_slow(bundles[ARCH]), "timeout_s": 0.001})
    assert late.status_code == 504 and late.json()["error"]["kind"] == "timeout"
    assert client.get("/health").status_code == 200  # and the server goes on
    beyond = client.post("/v1/correct", json={**_slow(bundles[ARCH]), "timeout_s": 31})
    assert beyond.status_code == 422 and "at most 30" in beyond.json()["error"]["message"]


def test_an_api_key_guards_every_route_but_health_and_the_api_description(bundles):
    request = make_requests(1, seed=2)[0]
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, api_key=KEY)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["models"] is None  # the bundles' paths are the machine's
        assert c.get("/health", headers={"Authorization": f"Bearer {KEY}"}).json()["models"]["corrector"] == \
            str(bundles[ARCH])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in (("POST", "/v1/correct"), ("GET", "/metrics"), ("GET", "/nowhere")):
                answer = c.request(method, path, json=request, headers=headers)
                assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/correct", json=request, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # A browser opening /docs sends no key, for the page or for the document it fetches; the
        # document says which operations need it, so that the page can send it.
        assert c.get("/docs").status_code == 200 and c.get("/redoc").status_code == 200
        document = c.get("/openapi.json").json()
        assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
        assert document["paths"]["/v1/correct"]["post"]["security"] == [{"bearer": []}]
        assert document["paths"]["/health"]["get"]["security"] == []
        # every answer the server gives is in the document: 401 where the key is needed, /health's body
        assert "401" in document["paths"]["/metrics"]["get"]["responses"]
        assert "500" in document["paths"]["/v1/correct"]["post"]["responses"]
        health = document["paths"]["/health"]["get"]["responses"]
        for status in ("200", "503"):
            schema = health[status]["content"]["application/json"]["schema"]
            assert set(schema["required"]) == set(c.get("/health").json()) == {"status", "live", "ready", "models"}
    with pytest.raises(InputError, match="API key"):
        ServeConfig(host="0.0.0.0")
    with pytest.raises(InputError, match="white space at an end"):
        ServeConfig(api_key="sekret ")
    assert ServeConfig(host="0.0.0.0", insecure=True).insecure


def test_a_body_that_stops_arriving_gets_408_and_does_not_hold_the_drain(bundles):
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, timeout_s=1)) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /v1/correct HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"source\": ")
            answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer
        deadline = time.monotonic() + TIMEOUT  # counted out once the answer is handed over, which the client may read first
        while s.state.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:  # a slow client, not a slow server (504's "timeout")
            assert _metrics(c)[("lmcor_errors_total", (("kind", "body_timeout"),))] == 1


def test_an_internal_error_answers_500_and_keeps_the_connection(bundles, monkeypatch, caplog):
    """The models failing on a batch is its requests' 500 (kind internal) and one log line with the
    traceback; the connection stays open for the client's next request (an error raised past the app
    made uvicorn close it, and a client that sent its next request on it got a reset)."""
    import http.client

    from lmcor.runtime import scheduler

    real, failed = scheduler.encode_batch, []

    def failing_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("the encoder failed today")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler, "encode_batch", failing_once)
    body = json.dumps(make_requests(1, seed=2)[0])
    with running(ServeConfig(model=str(bundles[ARCH]), port=0)) as s:
        host, port = s.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            answers = []
            for _ in range(2):
                connection.request("POST", "/v1/correct", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answers.append((response.status, json.loads(response.read())))
        finally:
            connection.close()
    assert answers[0] == (500, {"error": {"kind": "internal", "message": "RuntimeError: the encoder failed today"}})
    assert answers[1][0] == 200 and answers[1][1]["output"]
    logged = [r for r in caplog.records if r.exc_info and "the encoder failed today" in str(r.exc_info[1])]
    assert [r.name for r in logged] == ["lmcor.server"]


def test_a_stopped_engine_fails_requests_at_once_and_health_says_failed(bundles, monkeypatch):
    """An engine whose loop stopped answers at once (500, naming the error), /health turns 503
    "failed", and the server exits rather than serve on without a corrector."""
    from lmcor.runtime import engine as engine_module

    def no_scheduler(*args, **kwargs):
        raise RuntimeError("no scheduler today")

    monkeypatch.setattr(engine_module, "Scheduler", no_scheduler)
    with running(ServeConfig(model=str(bundles[ARCH]), port=0)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        first = c.post("/v1/correct", json=make_requests(1, seed=2)[0])
        assert first.status_code == 500 and "no scheduler today" in first.json()["error"]["message"]
        assert s.state.status == "failed"


def test_a_stopped_engine_lets_the_other_models_answer_what_they_took(bundles, gpt2_bundle, monkeypatch):
    """The server goes once what is in flight is answered: a generation taken before the engine
    stopped gets its answer (uvicorn's shutdown cut it after a second)."""
    from lmcor.runtime import engine as engine_module
    from lmcor.server import models

    def no_scheduler(*args, **kwargs):
        raise RuntimeError("no scheduler today")

    # The generation waits until the test lets it go, so that it is still in flight when the new one
    # comes, however slowly this machine runs the calls before (a fixed sleep ran out on a busy one).
    generate, started, release = models._generate, threading.Event(), threading.Event()

    def slow_generate(*args):
        started.set()
        release.wait(TIMEOUT)
        return generate(*args)

    monkeypatch.setattr(engine_module, "Scheduler", no_scheduler)
    monkeypatch.setattr(models, "_generate", slow_generate)
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, generators={"tiny": str(gpt2_bundle)})) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c, ThreadPoolExecutor(1) as pool:
        generated = pool.submit(c.post, "/v1/generate", json={"prompt": "The cat", "max_new_tokens": 4})
        try:
            assert started.wait(TIMEOUT)
            assert c.post("/v1/correct", json=make_requests(1, seed=2)[0]).status_code == 500
            deadline = time.monotonic() + TIMEOUT
            while not s.state.draining:  # the server saw its engine stop (at its next tick)
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = c.post("/v1/generate", json={"prompt": "The cat"})  # takes nothing new
        finally:
            release.set()
        assert refused.status_code == 503
        assert generated.result().status_code == 200


def test_while_draining_new_requests_get_503_and_those_in_flight_are_answered(bundles, monkeypatch):
    from lmcor.runtime import scheduler

    # The engine's decoder calls wait until the test lets them go, so that both requests are still in
    # flight when the drain starts, however slowly this machine runs their HTTP calls.
    release, step = threading.Event(), scheduler.decode_step
    monkeypatch.setattr(scheduler, "decode_step", lambda batch: release.wait(TIMEOUT) and step(batch))
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, max_batch=1)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c, ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(c.post, "/v1/correct", json=_slow(bundles[ARCH], n)) for n in range(2)]
        deadline = time.monotonic() + TIMEOUT
        while s.state.pending("correct") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        try:
            s.state.drain()
            refused = c.post("/v1/correct", json=make_requests(1, seed=2)[0])
            health = c.get("/health")
            assert not any(f.done() for f in in_flight)
        finally:
            release.set()  # a failure above must not leave the drain waiting on held calls
        assert [f.result().status_code for f in in_flight] == [200, 200]
    assert refused.status_code == 503 and refused.json()["error"]["kind"] == "draining"
    assert health.status_code == 503 and health.json()["status"] == "draining"


def test_a_drain_waits_for_a_large_answer_to_be_read(bundles):
    """An answer handed whole to the connection (the request done, nothing in flight) but not yet read
    by its slow client is sent to its end before the server goes (it was cut a second into the drain)."""
    items = [{"id": f"{n}-" + "x" * 60_000, "source": "she go home", "candidates": ["She goes home."]}
             for n in range(100)]
    body = json.dumps(items).encode()  # 6 MB asked, 6 MB answered: more than the kernel's buffers hold
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, max_body_bytes=2 * len(body), max_queue=200)) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
            client.sendall(b"POST /v1/correct HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = client.recv(65_536)
            deadline = time.monotonic() + TIMEOUT
            while s.state.in_flight:  # answered: the server holds nothing in flight, only unsent bytes
                assert time.monotonic() < deadline
                time.sleep(0.01)
            s.state.drain()
            time.sleep(2)  # past uvicorn's graceful shutdown of a second
            while chunk := client.recv(1 << 20):
                received += chunk
    head, _, answer = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    assert len(answer) == length and [r["id"] for r in json.loads(answer)] == [r["id"] for r in items]


# Served one at a time, enough slow requests that the server is still draining when the late one comes.
IN_FLIGHT = 12


def test_sigterm_answers_every_request_in_flight_and_exits_0(bundles, tmp_path):
    log = tmp_path / "stderr.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "lmcor.cli", "serve", "--model", str(bundles[ARCH]), "--port",
                                "0", "--max-batch", "1"], stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                               env={k: v for k, v in os.environ.items() if k != "LMCOR_API_KEY"})
    try:
        url = process.stdout.readline().strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:"), url
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c, ThreadPoolExecutor(IN_FLIGHT) as pool:
            deadline = time.monotonic() + TIMEOUT
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            in_flight = [pool.submit(c.post, "/v1/correct", json=_slow(bundles[ARCH], n)) for n in range(IN_FLIGHT)]
            while True:  # every request accepted: pending or answered
                m = _metrics(c)
                if m[("lmcor_queue_depth", (("endpoint", "correct"),))] + sum(
                        v for (name, labels), v in m.items() if name == "lmcor_requests_total") >= IN_FLIGHT:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.005)
            process.send_signal(signal.SIGTERM)
            while c.get("/health").status_code != 503:  # the signal is handled between two of the server's steps
                assert time.monotonic() < deadline
                time.sleep(0.005)
            late = c.post("/v1/correct", json=make_requests(1, seed=2)[0])
            answers = [f.result() for f in in_flight]
        code = process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
    assert [a.status_code for a in answers] == [200] * IN_FLIGHT
    assert [a.json()["id"] for a in answers] == [f"slow-{n}" for n in range(IN_FLIGHT)]
    assert late.status_code == 503
    assert code == 0
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"listening", "ready", "draining", "stopped"} <= {entry["message"] for entry in logged}
    assert [entry["batches"] for entry in logged if entry["message"] == "ready"] == [1]  # --max-batch 1


def test_a_signal_as_it_starts_drains_it_and_a_second_stops_it_at_once(bundles, tmp_path):
    """SIGTERM right after the URL is printed drains (exit 0), not kills; a second SIGTERM while
    requests decode stops the process at once (143), without aborting inside ONNX Runtime."""
    command = [sys.executable, "-m", "lmcor.cli", "serve", "--model", str(bundles[ARCH]), "--port", "0", "--max-batch", "1"]
    env = {k: v for k, v in os.environ.items() if k != "LMCOR_API_KEY"}
    early = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        early.stdout.readline()
        early.send_signal(signal.SIGTERM)
        assert early.wait(timeout=TIMEOUT) == 0
    finally:
        early.kill()
    log = tmp_path / "stderr.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    try:
        url = process.stdout.readline().strip().rsplit(" ", 1)[-1]
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c, ThreadPoolExecutor(32) as pool:
            deadline = time.monotonic() + TIMEOUT
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # 32 requests one at a time, each decoding the bundle's whole limit: the drain outlasts the test
            body = _slow(bundles[ARCH])
            slow = [pool.submit(c.post, "/v1/correct", json={**body, "id": n}) for n in range(32)]
            while _metrics(c)[("lmcor_queue_depth", (("endpoint", "correct"),))] < 24:  # taken, waiting their turn
                assert time.monotonic() < deadline
                time.sleep(0.005)
            process.send_signal(signal.SIGTERM)
            while c.get("/health").status_code != 503:  # draining, with most requests still waiting
                assert time.monotonic() < deadline
                time.sleep(0.005)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=TIMEOUT)
            for f in slow:
                f.exception()  # answered or cut off: either way, not waited for
    finally:
        process.kill()
    assert code == 143
    assert "terminate called" not in log.read_text()
    assert "stopped at once by a second signal" in log.read_text()


def test_metrics_parse_and_count_requests(client):
    before = _metrics(client)
    for request in make_requests(3, seed=13):
        assert client.post("/v1/correct", json={**request, **DECODE}).status_code == 200
    client.post("/v1/correct", content=b"{")
    after = _metrics(client)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("lmcor_requests_total", endpoint="correct", outcome="decoded") == 3
    assert grew("lmcor_http_requests_total", route="/v1/correct", code="200") == 3
    assert grew("lmcor_errors_total", kind="bad_json") == 1
    assert grew("lmcor_correction_seconds_count", stage="total") == 3
    assert grew("lmcor_tokens_total", kind="output") > 0 and grew("lmcor_tokens_total", kind="drafted") > 0
    assert after[("lmcor_queue_depth", (("endpoint", "correct"),))] == 0
    assert ("lmcor_running_batch_size", ()) in after


def test_health_says_ready_with_the_models(client, bundles):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["ready"] and body["models"]["corrector"] == str(bundles[ARCH])
    assert set(body["models"]["classifiers"]) == {"gate"} and set(body["models"]["generators"]) == {"tiny"}


def test_config_file_paths_are_relative_to_it_and_flags_override_it(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"model": "models/c", "classifiers": {"g": "g"}, "port": 9000, "max_queue": 4}))
    config = ServeConfig.read(path, port=0)
    assert config.model == str(tmp_path / "models" / "c") and config.classifiers == {"g": str(tmp_path / "g")}
    assert (config.port, config.max_queue) == (0, 4)
    path.write_text(json.dumps({"max_qeueu": 4}))
    with pytest.raises(InputError, match="unknown key 'max_qeueu'"):
        ServeConfig.read(path)
    path.write_text('{"classifiers": {"a": "one", "a": "two"}}')  # Python's json keeps the last without a word
    with pytest.raises(InputError, match=rf"^{path}: cannot read the config: field 'a' appears twice"):
        ServeConfig.read(path)
    path.write_text('{"max_queue": 8.0, "port": 0.0, "threads": 2.0, "batches": 3.0, "model": "~/c"}')  # as bodies read 8.0
    config = ServeConfig.read(path)
    assert (config.max_queue, config.port, config.threads, config.batches) == (8, 0, 2, 3)
    assert config.model == str(Path.home() / "c")
    path.write_text('{"model": "~nosuchuser_lmcor/c"}')
    with pytest.raises(InputError, match=rf"^{path}: cannot expand '~nosuchuser_lmcor/c'"):
        ServeConfig.read(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match=rf"^{path}: cannot read the config"):
        ServeConfig.read(path)


def test_serve_flags_give_the_config_and_override_its_file(tmp_path):
    from lmcor.cli import _parser
    from lmcor.cli import serve as serve_cli

    path = tmp_path / "serve.json"
    path.write_text('{"batches": 1, "max_batch": 4, "port": 0}')
    parser, _ = _parser("serve")
    config = serve_cli.config(parser.parse_args(["serve", "--config", str(path), "--batches", "3"]))
    assert (config.batches, config.max_batch, config.port) == (3, 4, 0)
    assert serve_cli.config(parser.parse_args(["serve", "--config", str(path)])).batches == 1
    assert ServeConfig().batches == 2


def test_a_server_of_one_request_at_a_time_opens_no_second_batch(bundles):
    from lmcor.server.models import Models

    one = Models.load(ServeConfig(model=str(bundles[ARCH]), threads=2, max_batch=1))
    two = Models.load(ServeConfig(model=str(bundles[ARCH]), threads=2))
    assert (one.engine.batches, one.engine.narrow) == (1, None)
    assert two.engine.batches == 2 and two.engine.narrow is not None


def test_a_model_name_given_twice_is_refused(capsys):
    from lmcor.cli import main

    assert main(["serve", "--port", "0", "--classifier", "a=one", "--classifier", "a=two"]) == 2
    assert "--classifier a= is given twice (one and two)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [(["--model", ""], "path is empty"),
                                         (["--providers", "NopeProvider"], "'NopeProvider' is not an ONNX Runtime")])
def test_what_loading_would_refuse_is_refused_before_the_server_listens(capsys, flags, says):
    """A supervisor reads the "listening" line as up: nothing that fails the load may come after it."""
    from lmcor.cli import main

    assert main(["serve", "--port", "0", *flags]) == 2
    said = capsys.readouterr()
    assert says in said.err and "listening" not in said.out


def test_a_bundle_or_provider_a_config_file_names_is_said_with_the_file_and_key(tmp_path, capsys):
    from lmcor.cli import main

    config = tmp_path / "serve.json"
    for text, says in (('{"providers": ["NopeProvider"]}', f"{config}: providers: 'NopeProvider' is not"),
                       ('{"classifiers": {"a": "nowhere"}}', f"{config}: classifiers.a: {tmp_path / 'nowhere'}: no such")):
        config.write_text(text)
        assert main(["serve", "--port", "0", "--config", str(config)]) == 2
        assert says in capsys.readouterr().err
    # a flag's value overrides the file's, and a default is no value of the file's: the file is not named
    assert main(["serve", "--port", "0", "--config", str(config), "--classifier", "a=elsewhere"]) == 2
    assert capsys.readouterr().err.startswith("lmcor: error: classifiers.a: elsewhere: no such")
    config.write_text('{"max_batch": 4}')
    from lmcor.runtime.errors import BundleError
    from lmcor.server import models

    def missing(name):
        raise BundleError(f"no bundle {name!r} is installed with this lmcor")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "shipped_bundle", missing)
        assert main(["serve", "--port", "0", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("lmcor: error: model: no bundle 'default' is installed")


def test_providers_this_machine_lacks_may_serve_on_a_ray_cluster():
    """Where the models load here, a provider this ONNX Runtime build lacks is refused before the
    server listens; for Ray's replicas, whose machines may have it, only its name is checked."""
    import onnxruntime as ort
    from lmcor.server.config import ServeConfig
    from lmcor.server.models import Models

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime build has CUDA")
    config = ServeConfig(providers=("CUDAExecutionProvider",))
    with pytest.raises(InputError, match="none of CUDAExecutionProvider is available"):
        Models.check(config)
    Models.check(config, here=False)
    with pytest.raises(InputError, match="'NopeProvider' is not an ONNX Runtime execution provider"):
        Models.check(ServeConfig(providers=("NopeProvider",)), here=False)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_before_the_server_listens_ends_it_with_0(bundles, signum):
    """Nothing is in flight yet: it ends as a drain does, not killed (143) or interrupted (130)."""
    command = [sys.executable, "-c", "import os, signal, sys\n"
               "import lmcor.server.models as m\n"
               f"m.Models.check = staticmethod(lambda *_, **__: os.kill(os.getpid(), signal.{signum}))  # as it starts\n"
               "from lmcor.cli import main\nsys.exit(main(['serve', '--port', '0']))"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and "listening" not in done.stdout, done.stderr


def test_fuzzing_the_openapi_schema_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    cases = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    started, ran = time.monotonic(), []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def no_server_error(case):
        if time.monotonic() - started > 90:  # bounded: what has run so far stands
            return
        ran.append(case)
        response = case.call(base_url=server.url, timeout=TIMEOUT)
        # A deadline the request itself set, too short for its answer, is a 504 by design.
        own_deadline = response.status_code == 504 and "timeout_s" in json.dumps(case.body, default=str)
        assert response.status_code < 500 or own_deadline, (case.as_curl_command(), response.status_code,
                                                            response.text[:500])

    no_server_error()
    assert len(ran) >= 100  # a slow machine runs fewer in the time, not next to none


def test_bench_serve_smoke(bundles, tmp_path, capsys):
    from lmcor.bench import serve
    from lmcor.cli import main

    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_requests(8, seed=14)))
    out = tmp_path / "out"
    # t5's outputs stop at 32 tokens: t5v11's longest loop for hundreds, where near-tied logits of the random
    # weights can fall either way between batch shapes (the exactness tests above bound their lengths).
    code = main(["bench", "--serve", "--bundle", str(bundles["t5"]), "--data", str(data), "--seconds", "0.3",
                 "--clients", "1,4", "--requests", "8", "--threads", "1", "--batch-size", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "serve.json").read_text())
    assert len(report["servers"]) == 2 and report["rounds"] == serve.ROUNDS
    logs = {server["log"] for server in report["servers"].values()}  # each server's own, whatever the batch size
    assert len(logs) == 2 and all(Path(log).stat().st_size > 0 for log in logs)
    for server in report["servers"].values():
        assert server["exit_code"] == 0 and not server["ended_mid_run"]
        assert server["batches"] == 1  # one thread: one batch (its `ready` log line says so)
        for run in server["clients"].values():
            assert run["answered"] > 0 and run["lost"] == 0 and not run["errors"]
            assert run["identical_outputs"] == run["answered"]
    assert {"single_client_latency_vs_in_process"} <= set(report["ratios"])
    assert (out / "serve.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "same as offline" in printed and "1 batch(es) of at most 1 rows in all" in printed


def test_a_model_failure_mid_stream_is_an_error_event_and_the_stream_ends(bundles, monkeypatch):
    """The headers are sent: each request still gets its one answer, an `error` event (kind
    "internal"), and `done` ends the stream, which a client can tell from a dropped connection."""
    from lmcor.runtime import scheduler

    step, calls = scheduler.Scheduler.step, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 3:
            raise RuntimeError("out of memory today")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(scheduler.Scheduler, "step", failing)
    with running(ServeConfig(model=str(bundles[ARCH]), port=0)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        streamed = c.post("/v1/correct", json=[{**_slow(bundles[ARCH], n), "stream": True} for n in range(2)])
        events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
                  for block in streamed.text.strip().split("\n\n")]
        errors = [data for name, data in events if name == "error"]
        assert streamed.status_code == 200 and events[-1][0] == "done"
        assert sorted(e["index"] for e in errors) == [0, 1] and {e["kind"] for e in errors} == {"internal"}
        assert all("out of memory today" in e["message"] for e in errors)


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path):
    config = tmp_path / "serve.json"
    config.write_text('{"port": "18704", "max_batch": 4}')
    with pytest.raises(InputError, match=rf"^{config}: port must be an integer"):
        ServeConfig.read(config)
    assert ServeConfig.read(config, port=0).port == 0  # the flag's value replaces the file's
    with pytest.raises(InputError, match=r"^max_batch must be an integer"):
        ServeConfig.read(config, port=0, max_batch=0)  # a flag's: no file to name
    with pytest.raises(InputError, match=r"^batches must be an integer from 1 to 64, got 0"):
        ServeConfig.read(config, port=0, batches=0)
    config.write_text('{"timeout_s": 1' + "0" * 400 + "}")  # an integer past float's range
    with pytest.raises(InputError, match=rf"^{config}: timeout_s must be a number of seconds above 0"):
        ServeConfig.read(config)
    config.write_text('{"port": 1' + "0" * 5000 + "}")  # past Python's digits limit for int()
    with pytest.raises(InputError, match=rf"^{config}: cannot read the config"):
        ServeConfig.read(config)
    with pytest.raises(InputError, match="timeout_s must be a number of seconds above 0, got an integer of thousands"):
        ServeConfig(timeout_s=10**5000)  # from Python: past the digits repr writes
    for text, said in (('{"providers": []}', "providers must be a list of names"),  # none: no ONNX Runtime to run on
                       ('{"classifiers": {"a": ""}}', "classifiers must map names to bundle folders")):  # not the file's folder
        config.write_text(text)
        with pytest.raises(InputError, match=rf"^{config}: {said}"):
            ServeConfig.read(config)


def test_the_openapi_document_holds_the_limits_the_server_checks(client, bundles):
    """A body valid by the schema is not refused for a bound the schema left out, and one the server
    takes is valid by it: the options' bounds (max_new_tokens: this corrector's), nulls, 8.0 as 8."""
    from lmcor.runtime.bundle import load_manifest
    from lmcor.runtime.options import MAX_BEAMS

    doc = client.get("/openapi.json").json()
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) and "health_health_head" in ids and "health_health_get" in ids
    body = doc["paths"]["/v1/correct"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"][0]
    props = body["properties"]
    most = load_manifest(bundles[ARCH]).max_output_tokens
    assert props["num_beams"]["maximum"] == MAX_BEAMS and props["max_new_tokens"]["anyOf"][0]["maximum"] == most
    assert "gate_threshold" not in props  # this server has no gate to read it
    assert props["timeout_s"]["anyOf"][0]["maximum"] == 30  # the fixture's --timeout-s
    request = make_requests(1, seed=21)[0]
    for fields, status in (({"max_new_tokens": most}, 200), ({"max_new_tokens": most + 1}, 422),
                           ({"max_new_tokens": 4.0, "num_beams": 2.0}, 200), ({"max_new_tokens": 4.5}, 422),
                           ({"timeout_s": None}, 200)):
        assert client.post("/v1/correct", json={**request, **fields}).status_code == status, fields
    generate = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"][0]
    assert generate["properties"]["prompt"]["pattern"] == props["source"]["pattern"]  # not only white space
    answered = doc["paths"]["/v1/correct"]["post"]["responses"]["200"]["content"]
    assert set(answered) == {"application/json", "text/event-stream"}


def test_http_edges_get_json_errors(client):
    assert client.head("/health").status_code == 200 and client.head("/metrics").status_code == 200
    for path in ("/health", "/metrics"):  # a 405 allows both methods the path answers
        assert set(client.put(path).headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    huge = client.post("/v1/correct", content=b'{"id": 1e400, "source": "a", "candidates": ["b"]}')
    assert huge.status_code == 422 and huge.json()["error"]["message"].startswith("field 'id' is NaN, Infinity or a number out of range")
    for path in ("/v1/correct/", "/health/"):  # no redirect built from the client's Host header
        answer = client.post(path, json={}, headers={"Host": "localhost:1"})
        assert answer.status_code == 404 and answer.json()["error"]["kind"] == "not_found"
    squeezed = client.post("/v1/correct", content=b"\x1f\x8b\x08\x00", headers={"Content-Encoding": "gzip"})
    assert squeezed.status_code == 415 and "Content-Encoding 'gzip'" in squeezed.json()["error"]["message"]
    twice = client.post("/v1/correct", content=b"\x1f\x8b\x08\x00",  # the codings of every such header count
                        headers=[("Content-Encoding", "identity"), ("Content-Encoding", "gzip")])
    assert twice.status_code == 415 and "Content-Encoding 'identity, gzip'" in twice.json()["error"]["message"]
    lone = client.post("/v1/generate", content=b'{"id": "\\ud800", "prompt": "a", "max_new_tokens": 1}')
    assert lone.status_code == 422 and "lone surrogate" in lone.json()["error"]["message"]


def test_a_server_on_loopback_answers_requests_for_loopback_hosts_alone(client):
    """A web page's request reaches a loopback server through DNS rebinding (a name of the page's that
    resolves to 127.0.0.1) with the page's host in its Host header: refused, so the page cannot read
    the answers; what this machine's own clients send is answered."""
    port = client.base_url.port
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "[::2]:1", ""):
        for refused in (client.get("/health", headers={"Host": host}),
                        client.post("/v1/correct", json={"source": "she go", "candidates": ["She goes."], **DECODE},
                                    headers={"Host": host})):
            assert refused.status_code == 400 and refused.json()["error"]["kind"] == "bad_host", host
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}", "127.3.2.1"):
        answer = client.post("/v1/correct", json={"source": "she go", "candidates": ["She goes."], **DECODE},
                             headers={"Host": host})
        assert answer.status_code == 200, host
    # Two Host headers: a proxy may read the other one (it was answered, for the first)
    with socket.create_connection((client.base_url.host, port), timeout=TIMEOUT) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: attacker.example\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["message"] == \
        "the request has 2 Host headers; one at most"


def test_allowed_hosts_are_answered_on_loopback():
    """A proxy in front of a loopback server may keep its clients' Host: its name is allowed by
    --allow-host (or allowed_hosts), any with "*"."""
    from lmcor.cli.serve import add_arguments, config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config(parser.parse_args(["--allow-host", "Api.Example", "--allow-host", "*"])).allowed_hosts == \
        ("api.example", "*")
    for bad in (["a b"], [""], "api.example", [3]):
        with pytest.raises(InputError, match="allowed_hosts must be a list of host names"):
            ServeConfig(allowed_hosts=bad)
    with running(ServeConfig(port=0, allowed_hosts=("api.example",), max_batch=1)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        assert c.get("/health", headers={"Host": "API.example:443"}).status_code == 200
        assert c.get("/health", headers={"Host": "other.example"}).json()["error"]["kind"] == "bad_host"
    with running(ServeConfig(port=0, allowed_hosts=("*",), max_batch=1)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        assert c.get("/health", headers={"Host": "other.example"}).status_code == 200


def test_an_empty_api_key_in_the_environment_is_refused(monkeypatch, capsys):
    from lmcor.cli import main

    monkeypatch.setenv("LMCOR_API_KEY", "")
    assert main(["serve", "--port", "0"]) == 2
    assert "LMCOR_API_KEY is set but empty" in capsys.readouterr().err


def _slow_steps(monkeypatch) -> None:
    """Decoder calls of 5 ms at least: a request that were not withdrawn would decode for seconds,
    however late a loaded machine lets the server notice."""
    from lmcor.runtime import scheduler

    step = scheduler.decode_step
    monkeypatch.setattr(scheduler, "decode_step", lambda batch: time.sleep(0.005) or step(batch))


def test_requests_past_their_deadline_free_their_place_and_stream_nothing_more(bundles, monkeypatch):
    slow = _slow(bundles[ARCH])
    _slow_steps(monkeypatch)
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, max_queue=4)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        before = s.state.models.engine.stats
        late = c.post("/v1/correct", json=[{**slow, "id": n, "timeout_s": 0.02} for n in range(4)])
        assert late.status_code == 200 and all("no answer within 0.02 s" in r["error"]["message"] for r in late.json())
        # They leave the engine at its next step, not when their whole decode would have ended.
        deadline = time.monotonic() + 10
        while _metrics(c)[("lmcor_queue_depth", (("endpoint", "correct"),))]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        used = s.state.models.engine.stats - before
        assert used.rows < 4 * slow["max_new_tokens"] // 2
        assert c.post("/v1/correct", json=make_requests(1, seed=3)[0]).status_code == 200
        streamed = c.post("/v1/correct", json=[{**slow, "timeout_s": 0.02, "stream": True},
                                               {**make_requests(1, seed=3)[0], "stream": True}])
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in streamed.text.strip().split("\n\n")]
    error = next(i for i, (name, data) in enumerate(events) if name == "error" and data["index"] == 0)
    assert not [data for name, data in events[error:] if name == "token" and data["index"] == 0]


def test_a_connection_that_cannot_be_watched_is_no_client_leaving():
    """`receive` failing is not a disconnect: the answer still comes (and the failure is logged)."""
    from concurrent.futures import Future

    from lmcor.server.app import _all

    async def broken():
        raise RuntimeError("no receive here")

    async def answered():
        future = Future()
        asyncio.get_running_loop().call_later(0.05, future.set_result, "done")
        return await _all([future], [10.0], False, time.monotonic(), broken)

    assert asyncio.run(answered()) == ["done"]


def test_a_client_that_leaves_has_its_requests_withdrawn_and_a_flood_of_bad_items_is_refused(bundles, monkeypatch):
    """As a streaming client's: its requests leave the queue and the engine, are not counted answered,
    and the access log and metrics say 499. A list longer than the queue is refused whole, its items
    that would not parse counted (each cost the event loop an answer)."""
    slow = _slow(bundles[ARCH])
    _slow_steps(monkeypatch)
    with running(ServeConfig(model=str(bundles[ARCH]), port=0, max_queue=4, max_batch=1)) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        before, engine_before = _metrics(c), s.state.models.engine.stats
        body = json.dumps([{**slow, "id": n} for n in range(4)]).encode()
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"POST /v1/correct HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 10
            while not _metrics(c)[("lmcor_queue_depth", (("endpoint", "correct"),))]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        counted = ("lmcor_http_requests_total", (("code", "499"), ("route", "/v1/correct")))
        deadline = time.monotonic() + 30
        while (_metrics(c)[("lmcor_queue_depth", (("endpoint", "correct"),))] or
               _metrics(c).get(counted, 0) == before.get(counted, 0)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        used = s.state.models.engine.stats - engine_before  # one row at a time, withdrawn at its next step
        assert used.rows < slow["max_new_tokens"] // 2
        after = _metrics(c)
        assert after.get(counted, 0) == before.get(counted, 0) + 1
        decoded = ("lmcor_requests_total", (("endpoint", "correct"), ("outcome", "decoded")))
        assert after.get(decoded, 0) == before.get(decoded, 0)
        flood = c.post("/v1/correct", json=[0] * 5)
        assert flood.status_code == 413 and "5 requests in one body" in flood.json()["error"]["message"]


@pytest.mark.parametrize("clean_up", [False, True])
def test_streamed_tokens_spell_the_text_when_a_character_or_a_clean_up_spans_tokens(bundles, clean_up):
    """A byte-level tokenizer splits "é" over two tokens (decoded as U+FFFD until the second comes), and a
    clean-up joins " ," to the word before: what the next token may change waits, and the events still
    spell the whole text, each request's rest coming before its result."""
    from lmcor.runtime.spacing import cleaned_up
    from lmcor.server.app import _Tokens
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundles["bart"] / "tokenizer.json"))
    text = "the café , said he . naïve 😀 ! I do n ' t know what you ' re doing ."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert "\ufffd" in "".join(tokenizer.decode(ids[: n + 1]) for n in range(len(ids)))  # a character is split
    tokens = _Tokens(asyncio.new_event_loop(), tokenizer, 1, clean_up=clean_up)
    events = [event for token in ids for event in tokens.events([(0, [token])])] + tokens.rest(0)
    pieces = [json.loads(event.split("data: ")[1])["text"] for event in events]
    assert "".join(pieces) == (cleaned_up(text) if clean_up else text) and len(pieces) > 3
    assert not any("\ufffd" in piece for piece in pieces)


def test_the_schemas_text_pattern_reads_white_space_as_the_server_does(client):
    """JSON Schema's \\S is ECMA-262's; the schema spells out Python's white space instead, so a text
    the schema takes is one the server takes."""
    import re

    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/correct"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"][0]
    pattern = body["properties"]["source"]["pattern"]
    for text, taken in (("\x1c", False), ("\x85", False), ("\u3000", False), ("\ufeff", True), (" a", True)):
        assert bool(re.search(pattern, text)) is taken, repr(text)
        status = client.post("/v1/correct", json={"source": text, "candidates": ["a b"], "max_new_tokens": 4}).status_code
        assert (status == 200) is taken, (repr(text), status)
