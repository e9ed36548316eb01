"""The app's LocalBackend (ernie_edge/gui/backends.py) on the tiny model: reasoning and answer
split, timings, Stop within one engine step, clear errors. The remote backend is tested in
tests/test_gui_remote.py, the Local API server over the backend's engine in
tests/test_gui_local_server.py."""

from __future__ import annotations

import pytest

from gui_helpers import SCRIPT, THINK, ANSWER, loaded_model, scripted, tiny_edge_dir
from ernie_edge.gui.backends import (FINISH_CANCELLED, BackendError, LocalBackend, LocalSettings,
                                     TurnRequest)
from ernie_edge.sampling import SamplingParams

HELLO = [{"role": "user", "content": "Hello! 你好"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return loaded_model(tiny_edge_dir(tmp_path_factory.mktemp("gui-backends")))


@pytest.fixture
def ready(model):
    """ready(forced=None, context=4096): a loaded LocalBackend on the tiny model (its engine is
    closed after the test)."""
    backends = []

    def make(forced=None, context=4096) -> LocalBackend:
        b = LocalBackend(LocalSettings(str(model.path), context=context), model=model, forced=forced)
        backends.append(b)
        stages = []
        b.load(stages.append)
        assert stages[-1].stage == "Ready" and b.engine.context == context
        return b
    yield make
    for b in backends:
        b.close()


def test_scripted_turn_splits_reasoning_and_answer(ready):
    b = ready(forced=lambda req: SCRIPT)
    chunks = list(b.submit(TurnRequest(HELLO, SamplingParams(max_tokens=512))))
    assert "".join(c.reasoning for c in chunks) == THINK
    assert "".join(c.content for c in chunks) == ANSWER
    last = chunks[-1]
    assert last.finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert last.stats.completion_tokens > 10 and last.stats.ttft_s > 0 and last.stats.decode_tok_s > 0


def test_unscripted_turn_runs_the_model(ready):
    b = ready()
    chunks = list(b.submit(TurnRequest(HELLO, SamplingParams(max_tokens=8, seed=0))))
    assert chunks[-1].finish_reason in ("length", "stop")
    assert 1 <= chunks[-1].stats.completion_tokens <= 8


def test_cancel_stops_within_one_engine_step(ready):
    b = ready(forced=lambda req: scripted("think " * 200, "answer"))
    turn = b.submit(TurnRequest(HELLO, SamplingParams(max_tokens=2000)))
    it = iter(turn)
    for _ in range(5):
        next(it)
    turn.cancel()
    at_cancel = turn.steps  # read after cancel(): the engine runs ahead of this reader
    rest = list(it)
    assert rest[-1].finish_reason == FINISH_CANCELLED
    assert turn.steps <= at_cancel + 1
    assert rest[-1].stats.completion_tokens == turn.steps


def test_the_next_turn_after_a_cancel_reuses_the_kept_cache(ready):
    b = ready()
    turn = b.submit(TurnRequest(HELLO, SamplingParams(max_tokens=50, seed=1)))
    it = iter(turn)
    next(it)
    turn.cancel()
    list(it)
    chunks = list(b.submit(TurnRequest(HELLO, SamplingParams(max_tokens=4, seed=1))))
    assert chunks[-1].finish_reason in ("length", "stop")
    assert b.engine.stats().cached_tokens_total == chunks[-1].stats.prompt_tokens - 1  # all but the last


def test_bad_model_folder_names_the_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    b = LocalBackend(LocalSettings(str(tmp_path)))
    with pytest.raises(BackendError, match=str(tmp_path)):
        b.load(lambda p: None)


def test_conversation_longer_than_the_context_is_refused_clearly(ready):
    b = ready(context=64)
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(BackendError, match="context"):
        list(b.submit(TurnRequest(long, SamplingParams(max_tokens=8))))


def test_max_tokens_is_capped_to_the_room_left(ready):
    b = ready(forced=lambda req: scripted("x " * 100, "y"), context=128)
    chunks = list(b.submit(TurnRequest(HELLO, SamplingParams(max_tokens=4000))))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].stats.prompt_tokens + chunks[-1].stats.completion_tokens == 128
