"""GET /metrics: the engine's counters and gauges in Prometheus' text format (version 0.0.4)."""

from __future__ import annotations

from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(stats, http_counts: Counter, json_invalid: int, loaded: bool) -> str:
    """stats: EngineStats or None while the model loads; http_counts: (path, status) -> count."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP ernie_edge_{name} {help_}")
        lines.append(f"# TYPE ernie_edge_{name} {kind}")
        lines.extend(f"ernie_edge_{name}{labels} {value:g}" for labels, value in samples)

    metric("model_loaded", "gauge", "1 once the model is loaded and the API answers.", [("", int(loaded))])
    metric("http_responses_total", "counter", "HTTP responses by route and status code.",
           [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(http_counts.items())])
    if stats is None:
        return "\n".join(lines) + "\n"
    metric("requests_total", "counter", "Generation requests accepted by the engine.", [("", stats.requests_total)])
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full.",
           [("", stats.rejected_total)])
    metric("requests_finished_total", "counter", "Finished requests by finish reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(stats.finished.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", stats.prompt_tokens_total)])
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from kept KV caches.",
           [("", stats.cached_tokens_total)])
    metric("generation_tokens_total", "counter", "Generated tokens.", [("", stats.completion_tokens_total)])
    metric("decode_tokens_per_second", "gauge", "Aggregate decode rate over the recent decode steps.",
           [("", round(stats.decode_tokens_per_s, 3))])
    metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", len(stats.queued_ids))])
    metric("slots_busy", "gauge", "Slots running a request.", [("", stats.busy_slots)])
    metric("slots", "gauge", "Slots (requests decoded together).", [("", stats.slots)])
    metric("engine_steps_total", "counter", "Engine steps run.", [("", stats.steps)])
    metric("json_invalid_total", "counter", "json_object answers that were not a JSON object.", [("", json_invalid)])
    return "\n".join(lines) + "\n"
