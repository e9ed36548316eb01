"""generate_step -> stream_generate -> generate on the tiny synthetic model."""

from dataclasses import dataclass

import numpy as np
import pytest

import ernie_edge
from ernie_edge.errors import ContextLengthError
from ernie_edge.generate import Session, generate, render_prompt, stream_generate
from ernie_edge.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_dir):
    return ernie_edge.load(tiny_dir)


@pytest.fixture(scope="module")
def prompt(model):
    return render_prompt(model, prompt="Tell me about the sea.")


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


def test_stream_equals_generate_and_is_reproducible(model, prompt):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=24)
    chunks = list(stream_generate(model, prompt, params))
    result = generate(model, prompt, params)
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert generate(model, prompt, params).token_ids == result.token_ids
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert result.timings.completion_tokens == 24 and result.timings.prompt_tokens == len(prompt)


def test_greedy_matches_an_argmax_loop(model, prompt):
    cache = model.new_cache()
    logits, expected = model.prefill(prompt, cache), []
    for _ in range(12):
        nxt = int(np.argmax(logits[: model.tokenizer.vocab_size]))
        expected.append(nxt)
        logits = model.decode(nxt, cache)
    assert generate(model, prompt, greedy(12)).token_ids == expected


def test_stop_token_and_stop_string(model, prompt):
    ids = generate(model, prompt, greedy(12)).token_ids
    stop_at = ids[4]
    r = generate(model, prompt, greedy(12, stop_token_ids=(stop_at,)))
    assert r.finish_reason == "stop" and r.token_ids == ids[: ids.index(stop_at)]  # stop id not emitted
    text = model.tokenizer.decode(ids)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = generate(model, prompt, greedy(12, stop=(stop,)))
    assert r.finish_reason == "stop" and stop not in r.text and text.startswith(r.text)


def test_context_checks_name_both_numbers(model, prompt):
    with pytest.raises(ContextLengthError, match=rf"{len(prompt)} tokens.*context holds 64"):
        list(stream_generate(model, prompt, greedy(4), session=Session(model, max_context=64)))
    ctx = len(prompt) + 10
    with pytest.raises(ContextLengthError, match=r"max_tokens \(20\).*at most 10"):
        list(stream_generate(model, prompt, greedy(20), session=Session(model, max_context=ctx)))


def test_next_turn_reuses_the_cached_prefix(model):
    session = Session(model)
    messages = [{"role": "user", "content": "First question"}]
    first = generate(model, render_prompt(model, messages), greedy(8), session=session)
    messages += [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": "And then?"}]
    second_ids = render_prompt(model, messages)
    second = generate(model, second_ids, greedy(8), session=session)
    assert second.timings.cached_tokens > 10
    assert second.token_ids == generate(model, second_ids, greedy(8)).token_ids  # same as fresh
    assert first.timings.cached_tokens == 0


def test_reasoning_budget_makes_the_model_answer(model, prompt):
    r = generate(model, prompt, SamplingParams(seed=0, max_tokens=30), reasoning_budget=6)
    assert r.reasoning is not None and r.content is not None
    assert model.tokenizer.think_end_id in r.token_ids[6:8]


# ---- parsing through the whole pipeline, with a scripted model --------------------------------

@dataclass
class ScriptedModel:
    """Emits a fixed text token by token (one-hot logits): exercises the generate/parse path."""
    real: object
    script: list

    def __post_init__(self):
        self.config, self.path, self.tokenizer = self.real.config, self.real.path, self.real.tokenizer

    def new_cache(self):
        return self.real.new_cache()

    def prefill(self, ids, cache):
        cache.length += len(ids)
        logits = np.full(self.config.vocab_size, -1e9, np.float32)
        logits[self.script[min(cache.length - self.start, len(self.script) - 1)]] = 0.0
        return logits


def scripted(model, prompt, text):
    m = ScriptedModel(model, model.tokenizer.encode(text) + [model.tokenizer.im_end_id])
    m.start = len(prompt)
    return m


def test_tool_calls_end_with_finish_reason_tool_calls(model, prompt):
    text = ('I should call it.\n</think>\n\n\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "北京"}}\n</tool_call>\n')
    chunks = list(stream_generate(scripted(model, prompt, text), prompt, greedy(200)))
    calls = [c for ch in chunks for c in ch.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "北京"}')]
    assert chunks[-1].finish_reason == "tool_calls"
    assert "".join(c.reasoning for c in chunks) == "I should call it."


def test_answer_is_unwrapped(model, prompt):
    text = "Thinking hard.\n</think>\n\n<response>\nThe sea is big.\n</response>\n"
    r = generate(scripted(model, prompt, text), prompt, greedy(200))
    assert (r.reasoning, r.content, r.finish_reason) == ("Thinking hard.", "The sea is big.", "stop")


def test_prompt_cache_gives_the_same_answer(model):
    from ernie_edge.generate import PromptCache
    pc = PromptCache.for_chat(model)
    ids = render_prompt(model, prompt="Tell me about the sea.")
    assert 5 < len(pc.ids) < len(ids) and ids[: len(pc.ids)] == pc.ids
    cached = generate(model, ids, greedy(10), session=Session(model, prefix=pc))
    assert cached.timings.cached_tokens == len(pc.ids)
    assert cached.token_ids == generate(model, ids, greedy(10)).token_ids
    again = Session(model, prefix=pc)  # the prompt cache itself is not consumed
    assert generate(model, ids, greedy(10), session=again).token_ids == cached.token_ids
