"""Continuous batching on the tiny bundle's Step1: joining mid-flight changes no request's ids.

``DecodeLoop.step`` is what the scheduler's thread runs; most tests step it by hand, so arrivals
are staggered deterministically (a request is submitted when another has its n-th id) whatever
the machine's speed. The scheduler's thread is tested for what only it does: waking up when work
arrives, running requests submitted from other threads, closing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.decode_timing import StepRecorder
from errors import InvalidInputError, NotReadyError
from llm.batching import GROWTH_BLOCK, RowKVCache, kv_bytes_per_token, peak_kv_bytes
from llm.decode import DecodeLoop, StepStats, generate
from llm.generation import GenerationHandle, Status
from llm.prompts import PromptPair
from llm.sampling import GenerationResult
from llm.scheduler import Scheduler
from llm.text_tokenizer import load_text_tokenizer
from model_files import EDITX_DIR
from model_loader import load_llm
from tests.conftest import example_prompt_pairs

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> torch.nn.Module:
    return load_llm(tiny_bundle / EDITX_DIR, "base", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def pairs(tiny_bundle: Path) -> list[PromptPair]:
    """A clone and two edits of different lengths, from the bundle's tokenizer."""
    tok = load_text_tokenizer(tiny_bundle / EDITX_DIR)
    return example_prompt_pairs(tok, long_groups=12)


class Recorder(StepRecorder):
    """The benchmarks' step recorder: every step and admission, and with ``hold`` the loop held in its
    first step until ``release`` (so requests submitted meanwhile join together)."""


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def run(loop: DecodeLoop) -> None:
    with torch.inference_mode():
        while loop.busy:
            loop.step()


# Four requests: guided and unguided, argmax and sampled, different prompts and lengths.
CASES: list[dict[str, Any]] = [
    {"prompt": 0, "seed": 1, "intensity": 1.0, "max_new_tokens": 40},
    {"prompt": 1, "seed": 2, "intensity": 2.0, "max_new_tokens": 25},
    {"prompt": 2, "seed": 3, "intensity": 1.0, "max_new_tokens": 48},
    {"prompt": 0, "seed": 4, "intensity": 0.5, "max_new_tokens": 30},
]
JOIN_AT = {1: (0, 5), 2: (0, 9), 3: (1, 4)}  # request k is submitted when request i has its n-th id


def _run_staggered(
    model: torch.nn.Module,
    pairs: list[PromptPair],
    recorder: Recorder,
    do_sample: bool,
    cancel_at: tuple[int, int, int] | None = None,
) -> tuple[list[GenerationResult], list[GenerationHandle]]:
    """Run CASES with staggered arrivals; ``cancel_at`` = (victim, watcher, n): cancel victim at watcher's n-th id."""
    loop = DecodeLoop(model, max_batch_rows=16, observer=recorder)

    def submit(k: int) -> GenerationHandle:
        case = CASES[k]
        return loop.submit(
            pairs[case["prompt"]],
            seed=case["seed"],
            intensity=case["intensity"],
            max_new_tokens=case["max_new_tokens"],
            do_sample=do_sample,
        )

    handles = {0: submit(0)}
    with torch.inference_mode():
        while loop.busy:
            loop.step()
            for later, (earlier, n) in JOIN_AT.items():
                if later not in handles and earlier in handles and handles[earlier].steps_run == n:
                    handles[later] = submit(later)
            if cancel_at is not None and handles[cancel_at[1]].steps_run == cancel_at[2]:
                handles[cancel_at[0]].cancel()
    ordered = [handles[k] for k in range(len(CASES))]
    return [h.result() for h in ordered], ordered


def _alone(model: torch.nn.Module, pairs: list[PromptPair], k: int, do_sample: bool) -> GenerationResult:
    case = CASES[k]
    return generate(
        model,
        [pairs[case["prompt"]]],
        seed=case["seed"],
        intensity=case["intensity"],
        max_new_tokens=case["max_new_tokens"],
        do_sample=do_sample,
    )[0]


def _assert_really_batched(recorder: Recorder) -> None:
    sizes = [s.requests for s in recorder.steps]
    assert max(sizes) == len(CASES)  # all four ran in one step at some point
    assert sizes[0] == 1 and len(set(sizes)) >= 3  # they joined one by one and left at different steps


def test_greedy_output_is_the_same_alone_or_joining_mid_flight(model, pairs, recorder):
    results, handles = _run_staggered(model, pairs, recorder, do_sample=False)
    _assert_really_batched(recorder)
    for k, got in enumerate(results):
        alone = _alone(model, pairs, k, do_sample=False)
        assert got.token_ids.tolist() == alone.token_ids.tolist(), k
        assert np.array_equal(got.codes, alone.codes) and got.ending == alone.ending
        assert list(handles[k].ids(TIMEOUT_S)) == got.token_ids.tolist()  # the stream is exactly the result
        assert handles[k].steps_run == len(got.token_ids) and not got.cancelled
    assert len({tuple(r.token_ids.tolist()) for r in results}) == len(CASES)  # the requests really differ


def test_seeded_sampling_agrees_with_alone_up_to_float_noise(model, pairs, recorder):
    results, _ = _run_staggered(model, pairs, recorder, do_sample=True)
    _assert_really_batched(recorder)
    agree = total = 0
    for k, got in enumerate(results):
        alone = _alone(model, pairs, k, do_sample=True).token_ids.tolist()
        mine = got.token_ids.tolist()
        assert got.seed == CASES[k]["seed"]
        total += max(len(alone), len(mine))
        agree += sum(a == b for a, b in zip(alone, mine, strict=False))
    assert agree / total >= 0.95, f"token agreement {agree}/{total}"


def test_a_cancelled_request_stops_at_the_next_step_and_the_others_are_unaffected(model, pairs, recorder):
    victim, watcher, at = 2, 0, 20  # request 2 joined at request 0's 9th id; cancelled at its 20th
    results, handles = _run_staggered(model, pairs, recorder, do_sample=False, cancel_at=(victim, watcher, at))
    cancelled = results[victim]
    full = _alone(model, pairs, victim, do_sample=False).token_ids.tolist()
    assert cancelled.cancelled and not cancelled.stopped and handles[victim].status is Status.CANCELLED
    assert len(cancelled.token_ids) == 11 < len(full)  # joined 9 steps after request 0 started: no id after
    assert cancelled.token_ids.tolist() == full[:11]
    for k, got in enumerate(results):
        if k != victim:
            assert got.token_ids.tolist() == _alone(model, pairs, k, do_sample=False).token_ids.tolist(), k


def test_batch_rows_limit_and_fifo_admission(model, pairs, recorder):
    loop = DecodeLoop(model, max_batch_rows=3, observer=recorder)
    handles = [loop.submit(pairs[0], seed=0, max_new_tokens=8)]
    with torch.inference_mode():
        loop.step()
    # 1 (2 rows) runs long beside 0; when 0 leaves, one row is free: 2 (2 rows) must wait for it,
    # and 3 (1 row, would fit) must not skip ahead of 2
    guided = {1: True, 2: True, 3: False, 4: True, 5: False}
    handles += [
        loop.submit(pairs[k % 3], seed=k, intensity=2.0 if guided[k] else 1.0, max_new_tokens=30 if k == 1 else 8)
        for k in range(1, 6)
    ]
    first_step: dict[int, int] = {0: 0}
    with torch.inference_mode():
        while loop.busy:
            loop.step()
            for k, h in enumerate(handles):
                if h.steps_run and k not in first_step:
                    first_step[k] = len(recorder.steps)
    assert max(s.rows for s in recorder.steps) == 3 and len(recorder.waits) == 6
    order = [first_step[k] for k in range(6)]
    assert order == sorted(order) and len(set(order)) > 2  # admitted in arrival order, none overtaken


def test_kv_budget_queues_requests_yet_every_one_runs(model, pairs, recorder):
    per_token = kv_bytes_per_token(model)
    budget = per_token * (len(pairs[2].cond) + 20 + GROWTH_BLOCK)  # room for one unguided request at a time
    loop = DecodeLoop(model, max_batch_rows=16, kv_budget_bytes=budget, observer=recorder)
    handles = [loop.submit(pairs[k], seed=k, max_new_tokens=20) for k in range(3)]
    handles.append(loop.submit(pairs[1], seed=9, intensity=2.0, max_new_tokens=20))  # alone it exceeds the budget
    run(loop)
    assert max(s.requests for s in recorder.steps) == 1  # one at a time
    assert all(len(h.result().token_ids) == 20 for h in handles)


def test_kv_memory_stays_within_the_planned_peak_and_shrinks_when_the_long_row_leaves(model, pairs, recorder):
    loop = DecodeLoop(model, max_batch_rows=16, observer=recorder)
    loop.submit(pairs[1], seed=0, max_new_tokens=40)
    loop.submit(pairs[2], seed=1, max_new_tokens=5)
    seen: list[int] = []  # cache bytes at every step boundary
    with torch.inference_mode():
        while loop.busy:
            loop.step()
            seen.append(loop.kv_cache_bytes())
    plan = [(1, len(pairs[1].cond), 40), (1, len(pairs[2].cond), 5)]
    assert max(seen) <= peak_kv_bytes(plan, kv_bytes_per_token(model))
    widths = [s.width for s in recorder.steps]
    long_gone = [s for s in recorder.steps if s.requests == 1][-1]
    assert long_gone.width < len(pairs[2].cond)  # the long prompt's columns were cut when it left
    assert max(widths) >= len(pairs[2].cond)


def test_row_cache_join_and_leave_keep_each_row_right_aligned() -> None:
    cache = RowKVCache(n_layers=1, n_rows=1)
    k = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1) + 1
    cache.update(k, k, 0)
    cache.lengths = [6]
    other = RowKVCache(n_layers=1, n_rows=2)
    k2 = torch.full((2, 1, 9, 1), 7.0)
    other.update(k2, k2, 0)
    other.lengths = [9, 4]
    cache.join(other)
    assert cache.width == 9 and cache.lengths == [6, 9, 4]
    assert cache.mask(1).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10, [0] * 5 + [1] * 5]
    keys, _ = cache.update(torch.full((3, 1, 1, 1), 9.0), torch.zeros(3, 1, 1, 1), 0)
    assert keys[0, 0, 3:, 0].tolist() == [1, 2, 3, 4, 5, 6, 9] and cache.lengths == [7, 10, 5]
    cache.leave([2, 0])  # the long row leaves: its columns go
    assert cache.width == 7 and cache.lengths == [5, 7]
    assert cache.keys[0][1, 0, :7, 0].tolist() == [1, 2, 3, 4, 5, 6, 9]
    assert cache.keys[0][0, 0, :7, 0].tolist() == [7, 7, 7, 7, 7, 7, 9]  # 2 padding columns (masked), then 5 real
    assert cache.keys[0][:, :, 7:].abs().sum() == 0  # spare columns are zeros


def test_peak_plan_covers_each_departure() -> None:
    # two 1-row requests: lengths 100 and 10, 5 and 50 steps left
    block = GROWTH_BLOCK
    assert peak_kv_bytes([(1, 100, 5), (1, 10, 50)], 1) == max(2 * (100 + 5 + block), 10 + 50 + block)
    assert peak_kv_bytes([], 1) == 0


def test_prometheus_metrics_see_shared_steps(model, pairs):
    from api.metrics import Metrics

    metrics = Metrics(lambda: {})
    loop = DecodeLoop(model, max_batch_rows=16, observer=metrics, variant="base")
    handles = [loop.submit(pairs[0], seed=0, max_new_tokens=10), loop.submit(pairs[1], seed=1, max_new_tokens=10)]
    run(loop)
    tokens = sum(len(h.result().token_ids) for h in handles)
    value = metrics.registry.get_sample_value
    assert value("step_audio_llm_tokens_total", {"variant": "base"}) == tokens
    assert value("step_audio_llm_queue_wait_seconds_count", {"variant": "base"}) == 2
    steps = value("step_audio_llm_batch_size_count", {"variant": "base"})
    assert steps < tokens  # the two requests shared decode steps
    assert value("step_audio_llm_batch_size_bucket", {"variant": "base", "le": "1.0"}) < steps
    assert value("step_audio_llm_decode_seconds_total", {"variant": "base"}) > 0


# ---- the scheduler's thread ------------------------------------------------------------------


@pytest.fixture
def sched(model: torch.nn.Module, recorder: Recorder) -> Iterator[Scheduler]:
    s = Scheduler(model, max_batch_rows=16, observer=recorder)
    yield s
    s.close()


def test_the_thread_runs_what_other_threads_submit_as_the_hand_stepped_loop_does(model, pairs, sched):
    handles: list[GenerationHandle] = []
    submitters = [
        threading.Thread(target=lambda k=k: handles.append(sched.submit(pairs[k], seed=k, max_new_tokens=12)))
        for k in range(3)
    ]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join(TIMEOUT_S)
    for h in handles:
        alone = generate(model, [pairs[h.seed]], seed=h.seed, max_new_tokens=12)[0]
        assert h.result(TIMEOUT_S).token_ids.tolist() == alone.token_ids.tolist()


def test_cancelling_a_waiting_request_removes_it_from_the_queue(model, pairs):
    gate = Recorder(hold=True)
    sched = Scheduler(model, max_batch_rows=2, observer=gate)
    try:
        first = sched.submit(pairs[1], intensity=2.0, max_new_tokens=30, do_sample=False)
        assert gate.holding.wait(TIMEOUT_S)
        waiting = sched.submit(pairs[0], max_new_tokens=30)  # no room beside a guided request (2 rows)
        waiting.cancel()
        gate.release()
        assert waiting.result(TIMEOUT_S).cancelled and waiting.steps_run == 0
        alone = generate(model, [pairs[1]], intensity=2.0, max_new_tokens=30, do_sample=False)[0]
        assert first.result(TIMEOUT_S).token_ids.tolist() == alone.token_ids.tolist()  # not disturbed
    finally:
        gate.release()
        sched.close()


def test_bad_arguments_raise_at_submit(model, pairs, sched):
    with pytest.raises(InvalidInputError):
        sched.submit(pairs[0], intensity=9.0)
    with pytest.raises(InvalidInputError):
        sched.submit(pairs[0], max_new_tokens=0)
    with pytest.raises(InvalidInputError):
        sched.submit(PromptPair(cond=[], uncond=[1]))


@pytest.mark.parametrize(
    ("kwargs", "param"), [({"intensity": "abc"}, "intensity"), ({"temperature": None}, "temperature")]
)
def test_wrong_typed_sampling_arguments_are_invalid_input(model, pairs, sched, kwargs, param):
    """Checked as given, not after float(): a string or None is the caller's mistake (a 4xx), not a crash."""
    with pytest.raises(InvalidInputError) as err:
        sched.submit(pairs[0], **kwargs)
    assert err.value.param == param


def test_a_failing_observer_fails_no_generation(model, pairs):
    class Broken:
        def on_admit(self, variant: str, queue_wait_s: float) -> None:
            raise RuntimeError("metrics backend gone")

        def on_step(self, variant: str, stats: StepStats) -> None:
            raise RuntimeError("metrics backend gone")

    sched = Scheduler(model, observer=Broken())
    try:
        got = sched.submit(pairs[1], seed=2, max_new_tokens=10, do_sample=False).result(TIMEOUT_S)
    finally:
        sched.close()
    alone = generate(model, [pairs[1]], seed=2, max_new_tokens=10, do_sample=False)[0]
    assert got.token_ids.tolist() == alone.token_ids.tolist()


def test_ids_iterator_on_another_thread_yields_the_result_in_order(model, pairs, sched):
    pulled: list[int] = []
    handle = sched.submit(pairs[1], seed=5, intensity=1.5, max_new_tokens=30)
    consumer = threading.Thread(target=lambda: pulled.extend(handle.ids(TIMEOUT_S)))
    consumer.start()
    result = handle.result(TIMEOUT_S)
    consumer.join(TIMEOUT_S)
    assert pulled == result.token_ids.tolist() and len(pulled) > 5
    assert list(handle.ids(TIMEOUT_S)) == pulled  # after the end it replays and stops


def test_max_length_counts_the_prompt_and_is_honoured_per_request(model, pairs, sched):
    short = sched.submit(pairs[0], seed=1, max_length=len(pairs[0].cond) + 7)
    capped = sched.submit(pairs[1], seed=2, max_new_tokens=11, intensity=2.0)
    assert len(short.result(TIMEOUT_S).token_ids) <= 7 and len(capped.result(TIMEOUT_S).token_ids) <= 11
    alone = generate(model, [pairs[0]], seed=1, max_length=len(pairs[0].cond) + 7)[0]
    assert short.result().token_ids.tolist() == alone.token_ids.tolist()


def test_close_ends_waiting_and_running_requests(model, pairs):
    gate = Recorder(hold=True)
    sched = Scheduler(model, max_batch_rows=2, observer=gate)
    running = sched.submit(pairs[0], max_new_tokens=50)
    assert gate.holding.wait(TIMEOUT_S)
    waiting = sched.submit(pairs[1], intensity=2.0, max_new_tokens=50)
    closer = threading.Thread(target=sched.close)
    closer.start()
    gate.release()
    closer.join(TIMEOUT_S)
    for handle in (running, waiting):
        with pytest.raises(NotReadyError):
            handle.result(TIMEOUT_S)
    with pytest.raises(NotReadyError):
        sched.submit(pairs[0])


def test_kv_bytes_of_the_official_model_match_the_documented_default() -> None:
    from llm.config import Step1Config
    from llm.model import Step1ForCausalLM
    from settings import Settings

    with torch.device("meta"):
        full = Step1ForCausalLM(Step1Config()).to(torch.bfloat16)
    per_token = kv_bytes_per_token(full)
    assert per_token == 32 * 2**10  # 2 x 32 layers x 4 groups x 64 x 2 bytes
    budget = Settings.model_fields["llm_kv_cache_mib"].default * 2**20
    rows = Settings.model_fields["llm_max_batch_rows"].default
    assert rows * 8192 * per_token <= budget  # the default rows fit at the longest length (before block slack)
