"""The engine on the tiny converted model: continuous batching gives each request exactly what it
gets alone, cancellation frees slots within a step, the queue is bounded, memory and context are
refused with both numbers, prefill is chunked so running streams keep flowing, and the test hooks
(forced tokens) drive tool calls."""

import threading

import numpy as np
import pytest

import ernie_edge
from ernie_edge.engine import (Engine, EngineClosedError, EngineError, EngineRequest, EngineSettings,
                               QueueFullError)
from ernie_edge.errors import ContextLengthError, ErnieEdgeError
from ernie_edge.generate import Session, generate, render_prompt
from ernie_edge.sampling import SamplingParams
from serve_helpers import converted_tiny, wait_until


@pytest.fixture(scope="module")
def model(tiny_dir, tmp_path_factory):
    m = ernie_edge.load(converted_tiny(tiny_dir, tmp_path_factory), threads=1)
    m.warmup()
    return m


def prompt(model, text):
    return render_prompt(model, prompt=text)


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


def seeded(n, seed, **kw):
    return SamplingParams(temperature=0.9, top_p=0.9, seed=seed, max_tokens=n, **kw)


def test_requests_get_the_same_tokens_alone_and_together(model):
    """A request's tokens do not depend on what else runs: each row of a batched decode step has
    the bits it has alone (Model.decode_batch). Alone here is alone in the engine; the single-token
    decode that `generate` runs uses other kernels (matvec, not the small-batch matmul), whose
    logits differ in the last bits, so against it only the greedy tokens are compared."""
    prompts = [prompt(model, f"Question {i}: tell me about the sea.") for i in range(3)]
    cases = [(p, params) for p in prompts for params in (greedy(20), seeded(20, seed=7))]
    with Engine(model, EngineSettings(slots=4, context=256, prefix_cache=0)) as engine:
        expected = [engine.submit(EngineRequest(p, params)).result().token_ids for p, params in cases]
    for (p, params), tokens in zip(cases, expected):
        if params.temperature == 0.0:
            assert tokens == generate(model, p, params).token_ids
    with Engine(model, EngineSettings(slots=4, context=256, prefix_cache=0)) as engine:
        handles = [engine.submit(EngineRequest(p, params)) for p, params in cases]  # 6 requests, 4 slots
        together = [h.result() for h in handles]
        assert [r.token_ids for r in together] == expected
        assert max(len(set(h.token_steps)) for h in handles) == 20  # one token per step each
        assert all(r.finish_reason == "length" and r.timings.completion_tokens == 20 for r in together)
        stats = engine.stats()
        assert stats.busy_slots == 0 and stats.finished == {"length": 6} and stats.completion_tokens_total == 120


def test_decode_batch_is_called_every_step_even_for_one_request(model):
    calls = []

    class Batched:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode_batch(self, tokens, caches):
            calls.append(len(tokens))
            return np.stack([self.inner.decode(t, c) for t, c in zip(tokens, caches)])

    p = prompt(model, "Hello")
    with Engine(Batched(model), EngineSettings(slots=2, context=256)) as engine:
        engine.submit(EngineRequest(p, greedy(5))).result()
        assert calls == [1] * 4  # the first token comes out of the prefill
        calls.clear()
        a, b = engine.submit(EngineRequest(p, greedy(5))), engine.submit(EngineRequest(p[:-1], greedy(5)))
        a.result(), b.result()
        assert 2 in calls


def test_next_turn_reuses_the_kept_cache(model):
    messages = [{"role": "user", "content": "First question"}]
    first_ids = render_prompt(model, messages)
    messages += [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": "And then?"}]
    second_ids = render_prompt(model, messages)
    session = Session(model)  # the same reuse, done by hand
    generate(model, first_ids, greedy(8), session=session)
    expected = generate(model, second_ids, greedy(8), session=session)
    with Engine(model, EngineSettings(slots=1, context=256)) as engine:
        first = engine.submit(EngineRequest(first_ids, greedy(8))).result()
        second = engine.submit(EngineRequest(second_ids, greedy(8))).result()
    assert first.timings.cached_tokens == 0
    assert second.timings.cached_tokens == expected.timings.cached_tokens > 10
    assert second.token_ids == expected.token_ids
    assert engine.stats().cached_tokens_total == second.timings.cached_tokens


def test_cancel_stops_within_a_step_and_leaves_the_others_alone(model):
    a_ids, b_ids = prompt(model, "Stream A"), prompt(model, "Stream B")
    expected_a = generate(model, a_ids, seeded(60, seed=1)).token_ids
    with Engine(model, EngineSettings(slots=2, context=512)) as engine:
        a = engine.submit(EngineRequest(a_ids, seeded(60, seed=1)))
        b = engine.submit(EngineRequest(b_ids, greedy(400), ignore_eos=True))
        chunks = iter(b)
        for _ in range(3):
            next(chunks)
        b.cancel()
        produced = len(b.token_steps)
        rest = list(chunks)
        assert rest[-1].finish_reason == "cancelled"
        assert len(b.token_steps) - produced <= 1  # at most the step already running
        wait_until(lambda: b.id not in engine.stats().active_ids, 1.0, "the cancelled request's slot")
        assert a.result().token_ids == expected_a


def test_queue_is_bounded_and_a_queued_cancel_never_starts(model):
    gate = threading.Event()

    def hold(logits, history):  # keeps the worker inside request A until the test releases it
        gate.wait(10)
        return logits

    p = prompt(model, "Queue")
    with Engine(model, EngineSettings(slots=1, queue_size=1, context=256)) as engine:
        a = engine.submit(EngineRequest(p, greedy(3), logits_processor=hold))
        wait_until(lambda: engine.stats().busy_slots == 1, 5.0, "A admitted")
        b = engine.submit(EngineRequest(p, greedy(3)))
        with pytest.raises(QueueFullError, match="1 slots are busy and 1 requests are waiting"):
            engine.submit(EngineRequest(p, greedy(3)))
        b.cancel()
        assert b.finished and b.finish_reason == "cancelled" and engine.stats().queued_ids == ()
        c = engine.submit(EngineRequest(p, greedy(3)))  # the cancelled request's place is free again
        gate.set()
        assert a.result().finish_reason == "length" and c.result().finish_reason == "length"
        assert b.token_steps == [] and engine.stats().rejected_total == 1
        assert engine.stats().finished == {"cancelled": 1, "length": 2}


def test_context_and_memory_are_refused_with_both_numbers(model):
    p = prompt(model, "Hello there")
    with Engine(model, EngineSettings(slots=1, context=64)) as engine:
        with pytest.raises(ContextLengthError, match=rf"prompt is {len(p)} tokens; the context holds 64"):
            engine.submit(EngineRequest(p, greedy(4)))
    with Engine(model, EngineSettings(slots=1, context=len(p) + 10)) as engine:
        with pytest.raises(ContextLengthError, match=rf"max_tokens \(20\).*context holds {len(p) + 10}"):
            engine.submit(EngineRequest(p, greedy(20)))
        assert engine.stats().requests_total == 0
    with pytest.raises(ErnieEdgeError, match=r"KV cache for 16384 tokens needs 0\.0\d GiB, but only 0\.00 GiB"):
        Engine(model, EngineSettings(slots=3, prefix_cache=1, context=4096, kv_budget_bytes=1000))


def test_prefill_is_chunked_and_running_streams_keep_flowing(model):
    long_ids = prompt(model, "A long question " * 12)  # about 8 chunks of 16
    with Engine(model, EngineSettings(slots=2, context=512, prefill_chunk=16)) as engine:
        alone = engine.submit(EngineRequest(long_ids, greedy(10))).result().token_ids
        engine.clear_prefix_cache()
        a = engine.submit(EngineRequest(prompt(model, "Running"), greedy(300), ignore_eos=True))
        next(iter(a))  # A is decoding
        b = engine.submit(EngineRequest(long_ids, greedy(10)))
        together = b.result().token_ids
        a.cancel()
    chunks = -(-len(long_ids) // 16)
    first_b = b.token_steps[0]
    a_steps = set(a.token_steps)
    assert all(s in a_steps for s in range(first_b - chunks + 1, first_b + 1))  # A got a token every step
    assert together == alone


def test_forced_tokens_and_answer_prefix_make_a_tool_call(model):
    tok = model.tokenizer
    forced = tok.encode('Let me check.\n</think>{"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
                        '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n') + [tok.im_end_id]
    opening = tok.encode('\n\n\n<tool_call>\n{"name": "get_weather", "arguments": ')
    p = prompt(model, "Weather?")
    with Engine(model, EngineSettings(slots=1, context=512)) as engine:
        both = engine.submit(EngineRequest(p, greedy(200), forced_tokens=forced, answer_prefix_ids=opening)).result()
        one = engine.submit(EngineRequest(p, greedy(200), forced_tokens=forced, answer_prefix_ids=opening,
                                          max_tool_calls=1)).result()
    assert [(c.name, c.arguments) for c in both.tool_calls] == [
        ("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')]
    assert both.reasoning == "Let me check." and both.finish_reason == "tool_calls"
    assert both.timings.reasoning_tokens == len(tok.encode("Let me check.\n</think>"))
    assert [c.arguments for c in one.tool_calls] == ['{"city": "Paris"}'] and one.finish_reason == "tool_calls"


def test_reasoning_budget_forces_an_answer(model):
    tok = model.tokenizer
    with Engine(model, EngineSettings(slots=1, context=256)) as engine:
        r = engine.submit(EngineRequest(prompt(model, "Think"), seeded(40, seed=0), reasoning_budget=6)).result()
    assert tok.think_end_id in r.token_ids[6:9]
    assert r.reasoning is not None and r.timings.reasoning_tokens == 6 + len(tok.encode("\n</think>"))


def test_a_failing_request_does_not_stop_the_engine(model):
    def broken(logits, history):
        raise ValueError("boom")

    p = prompt(model, "Hello")
    with Engine(model, EngineSettings(slots=2, context=256)) as engine:
        bad = engine.submit(EngineRequest(p, greedy(5), logits_processor=broken))
        good = engine.submit(EngineRequest(p, greedy(5)))
        with pytest.raises(EngineError, match="internal error while generating"):
            bad.result()
        assert good.result().finish_reason == "length"
        assert engine.submit(EngineRequest(p, greedy(3))).result().timings.completion_tokens == 3
        with pytest.raises(EngineError, match=r"prompt_ids: token id 99999 is outside the vocabulary"):
            engine.submit(EngineRequest([1, 99999]))


def test_close_drains_accepted_requests_then_refuses(model):
    p = prompt(model, "Drain")
    engine = Engine(model, EngineSettings(slots=1, context=256))
    handles = [engine.submit(EngineRequest(p, greedy(6))) for _ in range(3)]
    engine.close(drain=True, timeout=30)
    assert [h.finish_reason for h in handles] == ["length"] * 3
    with pytest.raises(EngineClosedError):
        engine.submit(EngineRequest(p, greedy(3)))
