"""The engine: online requests from any thread decode as offline ones do, join a running batch between
decoder calls (a short one never waits for a long one), keep drafts exact, count their own stats,
and every future is answered: by a result, its own error, or a cancellation."""

import dataclasses
import logging
import sys
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait
from pathlib import Path

import pytest
from conftest import make_requests
from lmcor.bench.drafts import read_requests
from lmcor.runtime.bundle import shipped_bundle

from lmcor import Classifier, CorrectionOptions, Corrector, Engine, InputError, LmcorError

SPLIT = Path(__file__).resolve().parent.parent / "recipes" / "splits" / "test.jsonl"
RESULT_TIMEOUT = 120  # seconds: a test fails instead of hanging


def _engine(corrector: Corrector, batch_size: int = 16) -> Engine:
    return Engine(corrector.sessions, corrector.manifest, corrector.tokenizer, corrector.packed, batch_size=batch_size)


def _varied(count: int, seed: int) -> list[dict]:
    """Requests of very different lengths: one candidate of a few words up to five candidates, some
    of them several sentences long."""
    requests = make_requests(count, seed)
    for n, request in enumerate(requests):
        if n % 3 == 0:
            request["candidates"] = [" ".join([c] * 4) for c in request["candidates"]]
        elif n % 3 == 1:
            request["candidates"] = request["candidates"][:1]
    return requests


def _long(corrector: Corrector) -> tuple[dict, CorrectionOptions]:
    """A request forced to decode the bundle's whole max_output_tokens, one token per call."""
    cap = corrector.manifest.max_output_tokens
    return {"id": "long", "source": "she go home", "candidates": ["She goes home."]}, CorrectionOptions(
        max_new_tokens=cap, min_new_tokens=cap, drafts=False, no_repeat_ngram_size=0, fallback_below=0)


def _wait_until_decoding(engine: Engine, before: int) -> None:
    deadline = time.monotonic() + RESULT_TIMEOUT
    while engine.stats.decoder_calls == before:
        assert time.monotonic() < deadline, "the engine never started decoding"
        time.sleep(0.001)


@pytest.mark.parametrize("arch", ["t5v11", "bart"])
def test_online_submissions_from_threads_match_offline(bundles, arch):
    corrector = Corrector.load(bundles[arch])
    requests = _varied(30, seed=4)
    options = CorrectionOptions(max_new_tokens=24)
    offline = corrector.correct_batch(requests, options=options, batch_size=4)
    with _engine(corrector, batch_size=4) as engine, ThreadPoolExecutor(4) as pool:
        futures = list(pool.map(lambda r: engine.submit(r, options), requests))
        online = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
    assert [c.token_ids for c in online] == [c.token_ids for c in offline]
    assert [c.id for c in online] == [r["id"] for r in requests]
    if arch != "bart":  # the tiny random BART ignores its input: all its outputs run to the forced EOS
        assert len({len(c.token_ids) for c in online}) > 3, "the fixture should give outputs of many lengths"


@pytest.mark.parametrize("arch", ["t5v11", "bart"])
def test_two_workers_split_the_queue_and_answer_as_offline(bundles, arch, monkeypatch):
    """Each worker takes at most its share of `batch_size`, so a queue longer than that is decoded by
    both; while both have work each runs on the narrow sessions (a thread each), and the outputs are
    the offline ones."""
    from lmcor.runtime import scheduler as scheduler_module

    used: list[object] = []
    real_use = scheduler_module.Scheduler.use
    monkeypatch.setattr(scheduler_module.Scheduler, "use", lambda self, sessions: (used.append(sessions),
                                                                                   real_use(self, sessions)))
    corrector = Corrector.load(bundles[arch], threads=2, batches=2)
    engine = corrector.engine
    assert engine.batches == 2 and engine.narrow is not None
    assert engine.narrow.decoder.get_session_options().intra_op_num_threads == 1
    assert engine.sessions.decoder.get_session_options().intra_op_num_threads == 2
    requests = _varied(24, seed=41)
    options = CorrectionOptions(max_new_tokens=24)
    offline = corrector.correct_batch(requests, options=options, batch_size=4)
    workers: set[int] = set()
    with corrector:
        futures = [engine.submit(r, options, on_tokens=lambda _: workers.add(threading.get_ident()))
                   for r in requests]
        online = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
    assert [c.token_ids for c in online] == [c.token_ids for c in offline]
    assert len(workers) == 2
    assert engine.narrow in used


def test_max_batch_bounds_the_requests_of_all_workers_and_a_lone_worker_runs_on_every_thread(bundles, monkeypatch):
    from lmcor.runtime import scheduler as scheduler_module

    used: list[object] = []
    real_use = scheduler_module.Scheduler.use
    monkeypatch.setattr(scheduler_module.Scheduler, "use", lambda self, sessions: (used.append(sessions),
                                                                                   real_use(self, sessions)))
    corrector = Corrector.load(bundles["t5"], threads=2, batches=2)
    engine = Engine(corrector.sessions, corrector.manifest, corrector.tokenizer, batch_size=1, batches=2,
                    narrow=corrector.engine.narrow)
    requests = make_requests(12, seed=42)
    running: set[int] = set()
    overlaps = []

    def started(n: int) -> None:
        if n not in running:
            overlaps.append(set(running))
            running.add(n)

    with engine:
        futures = []
        for n, r in enumerate(requests):
            futures.append(engine.submit(r, CorrectionOptions(max_new_tokens=8), on_tokens=lambda _, n=n: started(n)))
            futures[-1].add_done_callback(lambda _, n=n: running.discard(n))
        answers = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
    assert overlaps and not any(overlaps), "one request at a time, whichever worker decodes it"
    assert [a.token_ids for a in answers] == [c.token_ids for c in corrector.correct_batch(requests, max_new_tokens=8)]
    assert used and set(map(id, used)) == {id(corrector.sessions)}, "alone, a worker runs on every thread"


def test_callbacks_in_two_workers_may_both_close_the_engine(bundles):
    """A done-callback runs in its worker: one that closes the engine returns at once instead of
    waiting for the other workers, which may be waiting for it the same way."""
    corrector = Corrector.load(bundles["t5v11"], threads=2, batches=2)
    long, forced = _long(corrector)
    engine = Engine(corrector.sessions, corrector.manifest, corrector.tokenizer, batch_size=2, batches=2,
                    narrow=corrector.engine.narrow)  # a share of one request each: one goes to each worker
    workers: set[int] = set()
    futures = [engine.submit({**long, "id": n}, forced, on_tokens=lambda _: workers.add(threading.get_ident()))
               for n in range(2)]
    for future in futures:
        future.add_done_callback(lambda _: engine.close())
    assert all(f.result(timeout=RESULT_TIMEOUT).text for f in futures)
    closing = threading.Thread(target=engine.close)
    closing.start()
    closing.join(timeout=RESULT_TIMEOUT)
    assert not closing.is_alive(), "the workers wait for each other"
    assert len(workers) == 2


def test_default_threads_are_the_physical_cores_this_process_may_use(monkeypatch):
    import os

    from lmcor.runtime.sessions import default_threads

    assert 1 <= default_threads() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_threads() == 1


@pytest.mark.parametrize("threads, batches, narrow", [(2, 4, 1), (1, 2, None), (4, 2, 2), (3, 2, 1)])
def test_batches_are_never_more_than_threads(bundles, threads, batches, narrow):
    engine = Corrector.load(bundles["t5"], threads=threads, batches=batches).engine
    assert engine.batches == min(threads, batches)
    got = engine.narrow.decoder.get_session_options().intra_op_num_threads if engine.narrow else None
    assert got == narrow


@pytest.mark.parametrize("batches", [0, 65, 1.5, "2", True])
def test_load_checks_batches(bundles, batches):
    with pytest.raises(InputError, match="^batches must be an integer from 1 to 64"):
        Corrector.load(bundles["t5"], batches=batches)


def test_beam_search_runs_online_as_static_batches(bundles):
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(10, seed=8)
    beams = CorrectionOptions(max_new_tokens=12, num_beams=3)
    greedy = CorrectionOptions(max_new_tokens=12)
    with _engine(corrector, batch_size=4) as engine:
        futures = [engine.submit(r, beams if n % 2 else greedy) for n, r in enumerate(requests)]
        online = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
    for n, (request, got) in enumerate(zip(requests, online)):
        [alone] = corrector.correct_batch([request], options=beams if n % 2 else greedy)
        assert got.token_ids == alone.token_ids


def test_a_short_request_submitted_while_a_long_one_decodes_finishes_first(bundles):
    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    short = make_requests(1, seed=2)[0]
    finished, later = [], {}

    def heard(tokens):  # the short one arrives while the long one decodes, however busy the machine
        if not later:
            later["short"] = engine.submit(short, CorrectionOptions(max_new_tokens=4))
            later["short"].add_done_callback(lambda _: finished.append("short"))

    with _engine(corrector) as engine:
        first = engine.submit(long, forced, on_tokens=heard)
        first.add_done_callback(lambda _: finished.append("long"))
        slow = first.result(timeout=RESULT_TIMEOUT)
        quick = later["short"].result(timeout=RESULT_TIMEOUT)
        shared = engine.stats.rows - engine.stats.decoder_calls  # calls that ran more than one row
    assert finished == ["short", "long"]
    assert len(slow.token_ids) == corrector.manifest.max_output_tokens
    assert slow.stats.decoder_calls == len(slow.token_ids)
    assert quick.stats.decoder_calls <= 4 and quick.stats.latency_s < slow.stats.latency_s
    assert shared >= quick.stats.decoder_calls - 1  # the short one decoded beside the long one
    assert quick.token_ids == corrector.correct_batch([short], max_new_tokens=4)[0].token_ids


def test_beside_a_long_row_arrivals_join_every_few_calls_not_every_call(bundles):
    """Each admission stalls the running rows for its encoder pass and prefill: beside a row that has run
    LONG_ROW_CALLS calls, a request that arrives just after another joined waits HOLD_CALLS calls (a few ms
    each), where it would otherwise join at the next call; one that arrives after a quiet spell joins at
    once."""
    from lmcor.runtime.scheduler import HOLD_CALLS, LONG_ROW_CALLS

    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    assert corrector.manifest.max_output_tokens > 2 * HOLD_CALLS + 10, "the long request must outlast the test"
    calls = {"long": 0}
    joined: dict[str, int] = {}  # the long row's calls when each short one wrote its first tokens
    later: dict = {}
    short = make_requests(2, seed=5)
    options = CorrectionOptions(max_new_tokens=2, min_new_tokens=2, drafts=False, no_repeat_ngram_size=0)

    def heard(name):
        def listener(tokens):
            joined.setdefault(name, calls["long"])
            if name == "first" and "second" not in later:  # arrives right after the first joined
                later["second"] = engine.submit(short[1], options, on_tokens=heard("second"))
        return listener

    def long_heard(tokens):
        calls["long"] += 1
        if calls["long"] == LONG_ROW_CALLS + HOLD_CALLS and not later:  # after a quiet spell
            later["first"] = engine.submit(short[0], options, on_tokens=heard("first"))

    with _engine(corrector) as engine:
        engine.submit(long, forced, on_tokens=long_heard).result(timeout=RESULT_TIMEOUT)
        later["first"].result(timeout=RESULT_TIMEOUT)
        later["second"].result(timeout=RESULT_TIMEOUT)
    assert joined["first"] == LONG_ROW_CALLS + HOLD_CALLS + 1  # at the call after it arrived
    assert joined["second"] - joined["first"] == HOLD_CALLS


def test_rows_admitted_mid_flight_keep_drafts_exact():
    corrector = Corrector.load()
    requests = read_requests(SPLIT, 24)
    plain = corrector.correct_batch(requests, batch_size=1, drafts=False, fallback_below=0)
    long, forced = _long(corrector)
    options = CorrectionOptions(fallback_below=0)
    with _engine(corrector, batch_size=8) as engine:
        first = engine.submit(long, forced)
        _wait_until_decoding(engine, 0)
        with ThreadPoolExecutor(3) as pool:  # in waves, while the long request and one another decode
            futures = list(pool.map(lambda r: engine.submit(r, options), requests))
        drafted = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
        assert not first.done(), "every request should have joined while the long one decoded"
        first.result(timeout=RESULT_TIMEOUT)
    assert [c.token_ids for c in drafted] == [c.token_ids for c in plain]
    accepted = sum(c.stats.accepted_tokens for c in drafted)
    assert 0 < accepted < sum(c.stats.drafted_tokens for c in drafted)
    assert sum(c.stats.decoder_calls for c in drafted) < sum(c.stats.decoder_calls for c in plain) / 2


@pytest.mark.parametrize("options", [CorrectionOptions(max_new_tokens=16),
                                     CorrectionOptions(max_new_tokens=16, drafts=False),
                                     CorrectionOptions(max_new_tokens=10, num_beams=2)])
def test_per_request_stats_add_up_to_the_engines(bundles, options):
    corrector = Corrector.load(bundles["t5v11"])
    before = corrector.engine.stats
    got = corrector.correct_batch(_varied(20, seed=6), options=options, batch_size=6)
    used = corrector.engine.stats - before
    assert used.requests == len(got)
    assert used.output_tokens == sum(c.stats.output_tokens for c in got) == sum(len(c.token_ids) for c in got)
    assert used.drafted_tokens == sum(c.stats.drafted_tokens for c in got)
    assert used.accepted_tokens == sum(c.stats.accepted_tokens for c in got)
    assert used.rows == sum(c.stats.decoder_calls for c in got)  # each call counts once per row it advanced
    assert used.decoder_calls < used.rows and used.encoder_calls < len(got)  # rows shared calls and passes
    assert 0 < used.tokenize_s and 0 < used.finish_s  # the engine's own stages around the models
    for c in got:
        s = c.stats
        assert s.latency_s == pytest.approx(s.queued_s + s.encoder_s + s.decoder_s)
        assert 0 < s.encoder_s and s.first_token_s <= s.latency_s


def test_online_requests_count_their_tokenizing_and_finishing(bundles):
    with Corrector.load(bundles["t5v11"]) as corrector:  # closed: no engine thread outlives the test
        before = corrector.engine.stats
        [corrector.engine.submit(r, CorrectionOptions(max_new_tokens=8)).result() for r in _varied(3, seed=2)]
        used = corrector.engine.stats - before
    assert used.requests == 3 and 0 < used.tokenize_s and 0 < used.finish_s


def test_close_answers_every_future(bundles):
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(24, seed=9)
    engine = _engine(corrector, batch_size=4)
    futures = [engine.submit(r, CorrectionOptions(max_new_tokens=16)) for r in requests]
    engine.close()
    assert all(f.done() for f in futures)
    assert [f.result().token_ids for f in futures] == [
        c.token_ids for c in corrector.correct_batch(requests, max_new_tokens=16)]
    with pytest.raises(InputError, match="closed"):
        engine.submit(requests[0])

    engine = _engine(corrector, batch_size=2)
    long, forced = _long(corrector)
    futures = [engine.submit(long, forced), *(engine.submit(r) for r in requests)]
    _wait_until_decoding(engine, 0)
    engine.close(cancel=True)
    assert not wait(futures, timeout=0).not_done
    assert futures[0].result().id == "long"  # decoding already: finished
    cancelled = [f for f in futures if f.cancelled()]
    assert cancelled, "requests still waiting should have been cancelled"
    for f in futures:
        if not f.cancelled():
            assert f.result().token_ids is not None
    with pytest.raises(CancelledError):
        cancelled[0].result()


class _Unreadable(dict):
    """A caller's mapping that fails to be read."""

    def get(self, key, default=None):
        raise KeyError(key)


class _UnreadableList(list):
    """A caller's list that fails to be read."""

    def __iter__(self):
        raise RuntimeError("boom")


class _UnreadableStr(str):
    def strip(self, *chars):
        raise ValueError("no strip")


def test_a_bad_request_fails_only_its_future(bundles):
    corrector = Corrector.load(bundles["t5"])
    good = make_requests(4, seed=12)
    bad = {
        1: ({"source": "", "candidates": ["x"]}, None, "field 'source' is empty"),
        2: ({"source": "she go\ud800", "candidates": ["x"]}, None, "lone surrogate"),
        3: ({"source": "word " * 2000, "candidates": ["x"]}, None, "the source is never cut"),
        5: (good[0], CorrectionOptions(max_new_tokens=10**6), "max_new_tokens must be an integer from 1 to 256"),
        6: ("not a request", None, "expected an object"),
        7: (_Unreadable(source="a b", candidates=["a"]), None, r"could not be read \(_Unreadable: KeyError"),
        8: (("she go", _UnreadableList(["x"])), None, r"could not be read \(tuple: RuntimeError: boom"),
        9: ([_UnreadableStr("she go"), ["x"]], None, r"could not be read \(list: ValueError: no strip"),
    }
    with _engine(corrector) as engine:
        with engine._cond:  # all in one arrival: each bad one fails alone
            futures = {n: engine.submit(request, options) for n, (request, options, _) in bad.items()}
            answers = [engine.submit(r, CorrectionOptions(max_new_tokens=8)) for r in good]
        for n, (_, _, message) in bad.items():
            with pytest.raises(InputError, match=message):
                futures[n].result(timeout=RESULT_TIMEOUT)
        got = [f.result(timeout=RESULT_TIMEOUT) for f in answers]
    assert [c.token_ids for c in got] == [c.token_ids for c in corrector.correct_batch(good, max_new_tokens=8)]


def test_a_signal_as_the_engine_thread_starts_leaves_one_engine_that_answers_all(bundles, monkeypatch):
    """Ctrl-C in `submit` after the thread began: that call is undone, and the thread it started takes
    nothing, so the next submission's thread is the one engine and `close` waits for all it took."""
    import types

    from lmcor.runtime import engine as engines

    class Interrupted(threading.Thread):
        armed, made = True, []

        def start(self):
            Interrupted.made.append(self)
            super().start()
            if Interrupted.armed:
                Interrupted.armed = False
                raise KeyboardInterrupt

    monkeypatch.setattr(engines, "threading", types.SimpleNamespace(
        Thread=Interrupted, Condition=threading.Condition, current_thread=threading.current_thread))
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(12, seed=15)
    engine = _engine(corrector, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        engine.submit(requests[0])
    futures = [engine.submit(r, CorrectionOptions(max_new_tokens=8)) for r in requests]

    def engines_alive() -> int:  # this engine's (other tests' engines may still idle)
        return sum(t.is_alive() for t in Interrupted.made)

    deadline = time.monotonic() + 5
    while engines_alive() > 1 and time.monotonic() < deadline:  # the interrupted call's thread leaves at once
        time.sleep(0.01)
    assert engines_alive() == 1
    engine.close()
    assert all(f.done() for f in futures)
    assert engines_alive() == 0
    assert [f.result().token_ids for f in futures] == [
        c.token_ids for c in corrector.correct_batch(requests, max_new_tokens=8)]


def test_a_failing_batch_fails_its_requests_and_the_engine_serves_on(bundles, monkeypatch):
    from lmcor.runtime import scheduler

    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(3, seed=14)
    broken = {"left": 1}
    real = scheduler.decode_step

    def flaky(batch):
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("the decoder failed")
        return real(batch)

    monkeypatch.setattr(scheduler, "decode_step", flaky)
    with _engine(corrector) as engine:
        failed = engine.submit(requests[0], CorrectionOptions(max_new_tokens=8, drafts=False))
        with pytest.raises(RuntimeError, match="the decoder failed"):
            failed.result(timeout=RESULT_TIMEOUT)
        later = [engine.submit(r, CorrectionOptions(max_new_tokens=8)) for r in requests]
        assert [f.result(timeout=RESULT_TIMEOUT).token_ids for f in later] == [
            c.token_ids for c in corrector.correct_batch(requests, max_new_tokens=8)]


def test_rows_finished_before_a_failure_in_the_same_step_are_answered(bundles, monkeypatch):
    """Two groups join in one step; the first finishes in its prefill, the second's prefill fails: the
    first keeps its correction (its tokens were whole), only the rest of the step fails."""
    from lmcor.runtime import scheduler

    corrector = Corrector.load(bundles["t5"])
    long = make_requests(1, seed=18)[0]
    long["candidates"] = [" ".join([c] * 4) for c in long["candidates"]]
    short = {"source": "she go home", "candidates": ["She goes home."]}  # too short to share its group
    calls = {"n": 0}
    real = scheduler.prefill

    def second_fails(batch, count):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the second prefill failed")
        return real(batch, count)

    one = CorrectionOptions(max_new_tokens=1, fallback_below=0)  # done in its first call
    expected = corrector.correct_batch([long], options=one)[0].token_ids
    with _engine(corrector, batch_size=4) as engine:
        held, hold = threading.Event(), threading.Event()
        running = engine.submit(make_requests(1, seed=19)[0],
                                CorrectionOptions(max_new_tokens=8, min_new_tokens=4, drafts=False),
                                on_tokens=lambda tokens: (held.set(), hold.wait(RESULT_TIMEOUT)))
        assert held.wait(RESULT_TIMEOUT)  # the engine's thread is held: both arrive in one step
        monkeypatch.setattr(scheduler, "prefill", second_fails)
        futures = [engine.submit(long, one), engine.submit(short, one)]  # longest first: its group's prefill
        hold.set()
        with pytest.raises(RuntimeError, match="the second prefill failed"):
            futures[1].result(timeout=RESULT_TIMEOUT)
        assert futures[0].result(timeout=RESULT_TIMEOUT).token_ids == expected
        with pytest.raises(RuntimeError, match="the second prefill failed"):  # the batch it joined fails
            running.result(timeout=RESULT_TIMEOUT)
    assert calls["n"] == 2


def test_an_engine_whose_loop_stops_fails_every_request_and_says_so(bundles, monkeypatch):
    """A failure of the loop itself (here: its scheduler cannot start) answers the requests taken with
    the error at once, and refuses later ones, naming it: no request waits out its deadline."""
    from lmcor.runtime import engine as engine_module

    corrector = Corrector.load(bundles["t5"])

    def no_scheduler(*args, **kwargs):
        raise RuntimeError("no scheduler today")

    monkeypatch.setattr(engine_module, "Scheduler", no_scheduler)
    engine = _engine(corrector)
    taken = engine.submit(make_requests(1, seed=15)[0], CorrectionOptions(max_new_tokens=8))
    with pytest.raises(LmcorError, match="stopped on an internal error: RuntimeError: no scheduler today"):
        taken.result(timeout=RESULT_TIMEOUT)
    for thread in engine._threads:
        thread.join(timeout=RESULT_TIMEOUT)
    assert isinstance(engine.failure, RuntimeError)
    with pytest.raises(LmcorError, match="stopped on an internal error .* no scheduler today"):
        engine.submit(make_requests(1, seed=15)[0])


def test_a_failure_past_a_failed_batch_answers_every_request_held(bundles, monkeypatch):
    """A batch fails, and so does the new batch meant to run the rest (the decoder cannot open): every
    request taken, running or waiting, is answered with the engine's error; none waits for ever."""
    from lmcor.runtime import scheduler

    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(4, seed=16)
    real = scheduler.open_decoder
    engine = _engine(corrector, batch_size=2)
    engine.submit(requests[0], CorrectionOptions(max_new_tokens=4)).result(timeout=RESULT_TIMEOUT)  # scheduler up
    held, hold = threading.Event(), threading.Event()
    running = engine.submit(requests[1], CorrectionOptions(max_new_tokens=8, min_new_tokens=4, drafts=False),
                            on_tokens=lambda tokens: (held.set(), hold.wait(RESULT_TIMEOUT)))
    assert held.wait(RESULT_TIMEOUT)  # decoding, held in its listener: the next ones wait behind it
    behind = [engine.submit(requests[2], CorrectionOptions(num_beams=2, max_new_tokens=4)),  # a new decoder
              engine.submit(requests[3], CorrectionOptions(max_new_tokens=4))]

    def failing(*args, **kwargs):
        raise RuntimeError("no decoder today")

    monkeypatch.setattr(scheduler, "open_decoder", failing)
    hold.set()
    assert running.result(timeout=RESULT_TIMEOUT).token_ids
    for future in behind:
        with pytest.raises(LmcorError, match="stopped on an internal error: RuntimeError: no decoder today"):
            future.result(timeout=RESULT_TIMEOUT)
    monkeypatch.setattr(scheduler, "open_decoder", real)


def test_a_done_callback_that_exits_while_close_cancels_leaves_the_engine_running(bundles, caplog):
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(2, seed=17)
    engine = _engine(corrector, batch_size=1)
    held, hold = threading.Event(), threading.Event()
    running = engine.submit(requests[0], CorrectionOptions(max_new_tokens=8, min_new_tokens=4, drafts=False),
                            on_tokens=lambda tokens: (held.set(), hold.wait(RESULT_TIMEOUT)))
    assert held.wait(RESULT_TIMEOUT)  # decoding, held in its listener; the next one waits for its row
    waiting = engine.submit(requests[1])
    waiting.add_done_callback(lambda f: sys.exit(1))
    closer = threading.Thread(target=engine.close, kwargs={"cancel": True})
    closer.start()
    deadline = time.monotonic() + RESULT_TIMEOUT
    while not engine._closed and time.monotonic() < deadline:  # close has asked to cancel the waiting one
        time.sleep(0.01)
    hold.set()
    closer.join(RESULT_TIMEOUT)
    assert waiting.cancelled() and not wait([waiting], timeout=0).not_done
    assert running.result(timeout=RESULT_TIMEOUT).token_ids and engine.failure is None
    assert "a done-callback of a correction's future raised SystemExit" in caplog.text


def test_a_bad_cache_layout_fails_at_load(bundles, monkeypatch):
    monkeypatch.setenv("LMCOR_CACHES", "bogus")
    with pytest.raises(InputError, match="LMCOR_CACHES must be host or device, got 'bogus'"):
        Corrector.load(bundles["t5"])


def test_the_gate_answers_online_before_admission(bundles):
    corrector = Corrector.load(bundles["t5"])
    gate = Classifier.load(shipped_bundle("gate"))
    requests = [{"source": "she go", "candidates": ["  ", "She goes."]},
                {"source": "She go to school every days.", "candidates": ["She goes to school every day.", "x"]},
                {"source": "They was late.", "candidates": ["They were late."]}]
    with _engine(corrector) as engine:
        got = [engine.submit(r, CorrectionOptions(max_new_tokens=4, gate_threshold=0.0), gate=gate).result(
            timeout=RESULT_TIMEOUT) for r in requests]
    assert not got[0].gated and got[1].gated and got[2].gated  # threshold 0 passes every candidate asked about
    assert got[1].text == requests[1]["candidates"][0] and got[1].stats.decoder_calls == 0


def test_options_come_as_keywords_or_as_one_object(bundles):
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(5, seed=1)
    options = CorrectionOptions(max_new_tokens=6, no_repeat_ngram_size=2, fallback_below=0)
    assert [c.token_ids for c in corrector.correct_batch(requests, options=options)] == [
        c.token_ids for c in corrector.correct_batch(requests, max_new_tokens=6, no_repeat_ngram_size=2,
                                                     fallback_below=0)]
    with pytest.raises(InputError, match="max_new_tokens: give the options either as keywords or as options="):
        corrector.correct_batch(requests, options=options, max_new_tokens=8)
    with pytest.raises(InputError, match="options must be a CorrectionOptions"):
        corrector.correct_batch(requests, options={"max_new_tokens": 6})
    with pytest.raises(InputError, match="min_new_tokens must be an integer from 0 to 4"):
        CorrectionOptions(max_new_tokens=4, min_new_tokens=5)


def test_on_tokens_hears_every_token_as_it_is_written(bundles):
    """The per-token hook gets each decoder call's new tokens (drafted ones in one piece), which add
    up to the output; one that raises (anything) stops listening and the request still finishes."""
    corrector = Corrector.load(bundles["t5v11"])
    requests = make_requests(6, seed=21)
    heard: dict[int, list[list[int]]] = {n: [] for n in range(len(requests))}
    with _engine(corrector) as engine:
        futures = [engine.submit(r, CorrectionOptions(max_new_tokens=32), on_tokens=heard[n].append)
                   for n, r in enumerate(requests)]
        broken = engine.submit(requests[0], CorrectionOptions(max_new_tokens=32), on_tokens=lambda ids: 1 / 0)

        def interrupting(ids):
            raise KeyboardInterrupt  # in the engine's thread: the listener's end, not the engine's

        stopped = engine.submit(requests[1], CorrectionOptions(max_new_tokens=32), on_tokens=interrupting)
        exited = engine.submit(requests[2], CorrectionOptions(max_new_tokens=32), on_tokens=lambda ids: sys.exit(0))
        results = [f.result(timeout=60) for f in futures]
        assert broken.result(timeout=60).text == results[0].text
        assert stopped.result(timeout=60).text == results[1].text and engine.failure is None
        assert exited.result(timeout=60).text == results[2].text
        with pytest.raises(InputError, match="on_tokens must be callable"):
            engine.submit(requests[0], on_tokens="print").result(timeout=60)
    for n, result in enumerate(results):
        assert [t for piece in heard[n] for t in piece] == result.token_ids
        calls = result.stats.decoder_calls  # the last call may write only EOS, which is not heard
        assert all(heard[n]) and calls - 1 <= len(heard[n]) <= calls


def test_a_gate_threshold_needs_a_gate(bundles):
    corrector = Corrector.load(bundles["t5"])
    request = make_requests(1, seed=16)[0]
    with pytest.raises(InputError, match="gate_threshold needs a gate"):
        corrector.correct_batch([request], gate_threshold=0.3)
    with _engine(corrector) as engine, pytest.raises(InputError, match="gate_threshold needs a gate"):
        engine.submit(request, CorrectionOptions(gate_threshold=0.3)).result(timeout=RESULT_TIMEOUT)


def test_a_gate_never_passes_a_first_candidate_far_from_the_source(bundles):
    """Five candidates that repeat a refusal: the gate is not asked, the corrector answers."""
    gate = Classifier.load(shipped_bundle("gate"))
    corrector = Corrector.load(bundles["t5"])
    refusal = ("She go to school every days.", ["I cannot help with that."] * 5)
    fixed = ("She go to school every days.", ["She goes to school every day."] * 5)
    answers = corrector.correct_batch([refusal, fixed], gate=gate, gate_threshold=0.0, max_new_tokens=8)
    assert not answers[0].gated and answers[1].gated and answers[1].text == fixed[1][0]


def test_a_gate_that_fails_fails_only_its_own_requests(bundles, tmp_path):
    """A gate without a 'right' label is refused when submitted; one that fails while it runs fails
    the requests behind it, not the others taken with them."""
    import shutil

    corrector = Corrector.load(bundles["t5"])
    gate = Classifier.load(shipped_bundle("gate"))
    labels = tmp_path / "labels"
    shutil.copytree(shipped_bundle("gate"), labels)
    manifest = (labels / "lmcor.json").read_text().replace('"right"', '"positive"').replace('"wrong"', '"negative"')
    (labels / "lmcor.json").write_text(manifest)
    sentiment = Classifier.load(labels, verify=False)
    requests = make_requests(12, seed=31)
    with _engine(corrector) as engine:
        refused = engine.submit(requests[0], gate=sentiment)
        assert refused.done() and "must have a 'right' label" in str(refused.exception())

        def broken(*args, **kwargs):
            raise RuntimeError("the gate's session failed")

        failing = Classifier.load(shipped_bundle("gate"))
        failing.classify_batch = broken
        options = CorrectionOptions(max_new_tokens=8)
        futures = [engine.submit(r, options, gate=failing if n % 3 == 0 else gate if n % 3 == 1 else None)
                   for n, r in enumerate(requests)]
        outcomes = [f.exception(timeout=RESULT_TIMEOUT) for f in futures]
    assert [n for n, e in enumerate(outcomes) if e is not None] == [0, 3, 6, 9]
    assert all("the gate's session failed" in str(outcomes[n]) for n in (0, 3, 6, 9))


def test_callbacks_in_the_engine_thread_cannot_stop_it(bundles):
    """A future's done-callbacks run in the engine's thread: one that raises SystemExit is logged, and
    one that closes the engine does not try to join its own thread."""
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(4, seed=32)
    engine = _engine(corrector)
    attached = threading.Event()  # the request waits until its callback is attached: it runs in the engine's thread
    first = engine.submit(requests[0], CorrectionOptions(max_new_tokens=8, drafts=False),
                          on_tokens=lambda ids: attached.wait(RESULT_TIMEOUT))
    first.add_done_callback(lambda f: sys.exit(3))
    attached.set()
    first.result(timeout=RESULT_TIMEOUT)
    second = engine.submit(requests[1], CorrectionOptions(max_new_tokens=8))
    want = corrector.correct_batch([requests[1]], max_new_tokens=8)[0].token_ids
    assert second.result(timeout=RESULT_TIMEOUT).token_ids == want and engine.failure is None
    closed, called, held = [], threading.Event(), threading.Event()
    third = engine.submit(requests[2], CorrectionOptions(max_new_tokens=8, drafts=False),
                          on_tokens=lambda ids: held.wait(RESULT_TIMEOUT))
    third.add_done_callback(lambda f: (closed.append(engine.close()), called.set()))
    held.set()
    assert called.wait(timeout=RESULT_TIMEOUT)  # callbacks run after the result is set: wait for this one
    assert closed == [None] and engine.failure is None
    with pytest.raises(InputError, match="this engine is closed"):
        engine.submit(requests[3])


def test_an_idle_engine_lets_its_thread_go_and_a_corrector_closes(bundles, monkeypatch):
    """The engine's thread ends after IDLE_S seconds without work (so a dropped Corrector is freed),
    and the next submission starts another; a Corrector used as a context manager closes its engine."""
    from lmcor.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "IDLE_S", 0.2)
    request = make_requests(1, seed=33)[0]
    others = set(threading.enumerate())  # engines of earlier tests may idle on (30 s)
    with Corrector.load(bundles["t5"]) as corrector:
        want = corrector.correct_batch([request], max_new_tokens=8)[0].text
        assert corrector.engine.submit(request, CorrectionOptions(max_new_tokens=8)).result(RESULT_TIMEOUT).text == want
        [thread] = corrector.engine._threads
        thread.join(timeout=RESULT_TIMEOUT)
        assert corrector.engine._threads == []
        assert not any(t.name == "lmcor-engine" and t.is_alive() for t in set(threading.enumerate()) - others)
        assert corrector.engine.submit(request, CorrectionOptions(max_new_tokens=8)).result(RESULT_TIMEOUT).text == want
    for options, gate in ((None, None), ({"num_beams": 2}, None), (None, 3)):  # refused before its options are read
        with pytest.raises(InputError, match="this engine is closed"):
            corrector.engine.submit(request, options, gate=gate)


def test_a_request_cancelled_while_it_decodes_leaves_the_batch_at_the_next_step(bundles):
    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    futures: dict[str, object] = {}
    cancelled: dict[str, tuple[bool, bool]] = {}
    stored = {"long": threading.Event(), "guarded": threading.Event()}

    def cancelling(name):  # at its first tokens, however busy the machine: running, and withdrawn
        def heard(tokens):
            if name not in cancelled and stored[name].wait(RESULT_TIMEOUT):  # its future is in `futures`
                cancelled[name] = (futures[name].running(), futures[name].cancel())
        return heard

    with _engine(corrector) as engine:
        futures["long"] = engine.submit(long, forced, on_tokens=cancelling("long"))
        stored["long"].set()
        result = futures["long"].result(timeout=RESULT_TIMEOUT)
        later = engine.submit(long, forced).result(timeout=RESULT_TIMEOUT)  # the engine serves on
        # With a fallback, a partial text is not weighed against the candidates: it is said to be partial.
        futures["guarded"] = engine.submit(long, dataclasses.replace(forced, fallback_below=99.0),
                                           on_tokens=cancelling("guarded"))
        stored["guarded"].set()
        partial = futures["guarded"].result(timeout=RESULT_TIMEOUT)
    assert cancelled == {"long": (True, False), "guarded": (True, False)}  # too late to skip: withdrawn instead
    assert len(result.token_ids) < corrector.manifest.max_output_tokens == len(later.token_ids)
    assert result.withdrawn and not later.withdrawn
    assert partial.withdrawn and not partial.fallback and len(partial.token_ids) < corrector.manifest.max_output_tokens


def test_a_cancel_after_the_last_token_leaves_the_answer_whole(bundles):
    """Its decoding ended before the cancel came: nothing is withdrawn, and the fallback weighs the
    whole output as offline (the late cancel marked it withdrawn and skipped the fallback)."""
    corrector = Corrector.load(bundles["t5v11"])
    long, _ = _long(corrector)
    options = CorrectionOptions(max_new_tokens=3, min_new_tokens=3, drafts=False, fallback_below=99.0)
    (offline,) = corrector.correct_batch([long], options=options)
    seen, box, stored = [], {}, threading.Event()

    def heard(tokens):  # the last of its tokens written: the row is done, its answer not yet made
        seen.extend(tokens)
        if len(seen) >= 3 and stored.wait(RESULT_TIMEOUT):  # its future is in `box`, however busy the machine
            box["cancelled"] = box["future"].cancel()

    with _engine(corrector) as engine:
        box["future"] = engine.submit(long, options, on_tokens=heard)
        stored.set()
        result = box["future"].result(timeout=RESULT_TIMEOUT)
    assert box["cancelled"] is False and not result.withdrawn
    assert (result.text, result.fallback) == (offline.text, offline.fallback) and offline.fallback


def test_a_thread_that_cannot_start_leaves_the_engine_usable(bundles, monkeypatch):
    corrector = Corrector.load(bundles["t5"])
    request = make_requests(1, seed=2)[0]
    engine = _engine(corrector)
    start = threading.Thread.start

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        engine.submit(request)
    monkeypatch.setattr(threading.Thread, "start", start)
    answer = engine.submit(request).result(timeout=RESULT_TIMEOUT)  # a thread this time, and one answer
    engine.close()
    assert answer.token_ids == corrector.correct_batch([request])[0].token_ids and not engine._inbox


def test_leaving_a_corrector_on_an_error_cancels_what_waits(bundles):
    """Ctrl-C inside `with Corrector.load() as c:` reaches the caller without waiting for the queue."""
    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    with pytest.raises(KeyboardInterrupt), corrector:
        futures = [corrector.engine.submit(long, forced) for _ in range(40)]
        _wait_until_decoding(corrector.engine, 0)
        raise KeyboardInterrupt
    assert sum(f.cancelled() for f in futures) > 20


def test_a_beam_search_whose_requests_are_all_cancelled_ends_early(bundles):
    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    beams = CorrectionOptions(**{**forced.__dict__, "num_beams": 4})
    with _engine(corrector) as engine:
        future = engine.submit(long, beams)
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not future.running():  # its static batch admitted (a full search here takes ~0.2 s)
            assert time.monotonic() < deadline and not future.done()
            time.sleep(0.001)
        assert not future.cancel()
        result = future.result(timeout=RESULT_TIMEOUT)
    assert len(result.token_ids) < corrector.manifest.max_output_tokens


def test_a_merged_decoder_lets_a_withdrawn_request_go_at_the_next_step(bundles):
    """BART's merged decoder cannot drop a row: a withdrawn one is fed padding from the next step, and
    its future holds what it wrote (it decoded to its end)."""
    corrector = Corrector.load(bundles["bart"])
    long, forced = _long(corrector)
    futures, withdrawn, stored = {}, [], threading.Event()

    def heard(tokens):  # withdrawn at its first tokens, however busy the machine
        if not withdrawn and stored.wait(RESULT_TIMEOUT):  # its future is in `futures`
            withdrawn.append(futures["long"].cancel())

    with _engine(corrector) as engine:
        futures["long"] = engine.submit(long, forced, on_tokens=heard)
        stored.set()
        result = futures["long"].result(timeout=RESULT_TIMEOUT)
    assert withdrawn == [False]  # running: withdrawn, not skipped
    assert len(result.token_ids) < corrector.manifest.max_output_tokens // 2  # not to its end (forced EOS)


def test_a_withdrawn_request_is_answered_when_a_cancelled_beam_search_is_next(bundles):
    """The rows withdrawn at a step, then a beam search at the head of the queue whose requests were
    all cancelled: the withdrawn ones are still answered (their futures stayed running for ever)."""
    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    futures, calls = {}, []

    def heard(tokens):
        calls.append(tokens)
        if len(calls) == 1:
            futures["beams"] = engine.submit(long, CorrectionOptions(num_beams=2, max_new_tokens=5))
        elif len(calls) == 3:
            futures["beams"].cancel()
            futures["long"].cancel()

    with _engine(corrector) as engine:
        futures["long"] = engine.submit(long, forced, on_tokens=heard)
        result = futures["long"].result(timeout=RESULT_TIMEOUT)
    assert len(result.token_ids) < corrector.manifest.max_output_tokens and futures["beams"].cancelled()


def test_a_request_cancelled_before_its_answer_counts_as_done_for_wait(bundles):
    """A request answered before admission (here a bad one) whose caller cancelled it meanwhile is
    marked notified: `concurrent.futures.wait` counts it done (it waited for ever)."""
    from concurrent.futures import wait

    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    cancelled = {}

    def heard(tokens):
        if not cancelled:
            cancelled["bad"] = engine.submit({"source": "the cat"})  # no candidates: refused in the engine's thread
            cancelled["bad"].cancel()

    with _engine(corrector) as engine:
        engine.submit(long, forced, on_tokens=heard).result(timeout=RESULT_TIMEOUT)
        done, _ = wait([cancelled["bad"]], timeout=RESULT_TIMEOUT)
    assert done == {cancelled["bad"]}


def test_a_cancelled_request_answered_twice_is_marked_once(bundles, monkeypatch, caplog):
    """A cancelled bad request answered in `_prepare`, then again when tokenizing its batch fails:
    marked notified once (a second time, concurrent.futures logged CRITICAL and raised)."""
    from lmcor.runtime import engine as engine_module

    corrector = Corrector.load(bundles["t5v11"])
    long, forced = _long(corrector)
    real, futures = engine_module.encode_requests, {}

    def failing(*args, **kwargs):
        if futures:  # the arrivals after the first request
            raise RuntimeError("the tokenizer failed")
        return real(*args, **kwargs)

    def heard(tokens):
        if not futures:
            futures["bad"] = engine.submit({"source": "the cat"})  # no candidates
            futures["bad"].cancel()
            futures["good"] = engine.submit(long, forced)

    monkeypatch.setattr(engine_module, "encode_requests", failing)
    with caplog.at_level("WARNING"), _engine(corrector) as engine:
        engine.submit(long, forced, on_tokens=heard).result(timeout=RESULT_TIMEOUT)
        with pytest.raises(RuntimeError, match="the tokenizer failed"):
            futures["good"].result(timeout=RESULT_TIMEOUT)
    assert futures["bad"].cancelled()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
