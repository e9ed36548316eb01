"""Serving: aggregate decode tokens/s with 1, 2, 4, 8 concurrent streams, what the HTTP layer adds
over calling the engine directly, and the time to first token of a chat's 2nd turn after a long
history (prefix reuse).

    .venv/bin/python benchmarks/serve.py --model MODEL [--threads 2] [--tokens 64]
        [--streams 1,2,4,8] [--history 2048] [--out benchmarks/results/serve.json]

- aggregate tok/s: B streams with different prompts, greedy, `ignore_eos`, --tokens each, on one
  engine. Counted over the window in which all B streams are decoding (from the last stream's
  first token to the first stream's last token), so joining prefills are outside it.
- HTTP overhead: the same B-stream runs through the OpenAI API (uvicorn on loopback, streamed SSE,
  httpx clients in a separate process, as an editor's or an agent's would be) vs engine.submit
  directly, alternated, best of --reps each; overhead = wall time ratio - 1. On a busy 2-core machine that ratio is noisy (+-20 %), so the CPU time the server's
  thread spends is measured too (Linux: /proc/self/task/TID/stat, which other processes do not
  disturb): per token, and as a fraction of the direct run's wall time. Every core runs a kernel
  thread, so the server's CPU time is what it takes from the engine.
- 2nd turn: turn 1 is a user message of about --history tokens; turn 2 re-sends it with the
  assistant's answer and a short question. TTFT of turn 2 with the kept cache (direct and over
  HTTP) and cold (the kept caches cleared first).

Writes the figures as JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ernie_edge.engine import Engine, EngineRequest, EngineSettings  # noqa: E402
from ernie_edge.generate import render_prompt  # noqa: E402
from ernie_edge.sampling import SamplingParams  # noqa: E402
from _machine import machine_load  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve.json"
FILLER = ("The harbour town wakes before dawn: fishing boats leave the quay, the bakery lights its ovens, "
          "and gulls circle the market square while the tide turns. ")


# ---- the HTTP server, in this process -----------------------------------------------------------

def thread_cpu_s(native_id: int) -> float | None:
    """CPU seconds (user + system) a thread of this process has used; None where /proc lacks it."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """The API over `engine` on 127.0.0.1:<free port>, served by uvicorn in a thread."""

    def __init__(self, engine: Engine):
        import uvicorn

        from ernie_edge.server.app import ServerState, create_app
        from ernie_edge.server.settings import ServeSettings
        self.sock = socket.create_server(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        state = ServerState(ServeSettings(model=str(engine.model.path), port=port))
        state.attach(engine, "bench")
        config = uvicorn.Config(create_app(state), http="h11", ws="none", lifespan="off", log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# ---- runs ---------------------------------------------------------------------------------------

def prompts(model, n: int) -> list[list[int]]:
    return [render_prompt(model, prompt=f"Story number {i}: tell me about the harbour town.") for i in range(n)]


def run_direct(engine: Engine, ids: list[list[int]], tokens: int) -> dict:
    """B streams through engine.submit; per-token arrival times from one reader thread each."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    stamps: list[list[float]] = [[] for _ in ids]
    engine.clear_prefix_cache()
    t0 = time.perf_counter()
    handles = [engine.submit(EngineRequest(p, params, ignore_eos=True)) for p in ids]

    def read(i):
        for chunk in handles[i]:
            stamps[i].extend([time.perf_counter()] * len(chunk.token_ids))

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(ids))]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    return {"wall_s": time.perf_counter() - t0, "aggregate_tok_s": window_rate(stamps)}


# The HTTP clients run in a process of their own, as an editor or an agent would: in this process
# their threads would contend with the engine's worker for the GIL, which the HTTP layer does not cost.
CLIENT = r"""
import json, sys, threading, time
import httpx
url = sys.argv[1]
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    ends = []

    def read(prompt):
        body = {"prompt": prompt, "max_tokens": job["tokens"], "temperature": 0.0, "ignore_eos": True,
                "stream": True}
        with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            for _ in r.iter_lines():
                pass
        ends.append(time.perf_counter())

    readers = [threading.Thread(target=read, args=(p,)) for p in job["prompts"]]
    t0 = time.perf_counter()
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    print(json.dumps({"wall_s": max(ends) - t0}), flush=True)
"""


class Clients:
    """The process that runs the HTTP streams of `run_http`."""

    def __init__(self, url: str):
        import subprocess
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the HTTP client process did not start")

    def run(self, prompts: list[list[int]], tokens: int) -> float:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["wall_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def run_http(server: Server, clients: Clients, ids: list[list[int]], tokens: int, engine: Engine) -> dict:
    """The same B streams through POST /v1/completions (token-id prompts, streamed), from the
    client process."""
    engine.clear_prefix_cache()
    cpu0 = thread_cpu_s(server.thread.native_id)
    wall = clients.run(ids, tokens)
    cpu1 = thread_cpu_s(server.thread.native_id)
    return {"wall_s": wall, "server_cpu_s": None if cpu0 is None else cpu1 - cpu0}


def window_rate(stamps: list[list[float]]) -> float:
    """Tokens per second while every stream was decoding: (last first-token, first last-token]."""
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    n = sum(sum(1 for t in s if start < t <= end) for s in stamps)
    return n / (end - start) if end > start else 0.0


def second_turn(engine: Engine, url: str, history: int) -> dict:
    """TTFT of a 2nd chat turn after a ~history-token first message: kept cache, HTTP, cold."""
    model = engine.model
    text = FILLER
    while len(render_prompt(model, [{"role": "user", "content": text}])) < history:
        text += FILLER
    turn1 = [{"role": "user", "content": text}]
    turn2 = turn1 + [{"role": "assistant", "content": "It is a quiet fishing town."},
                     {"role": "user", "content": "What happens at noon?"}]
    ids1, ids2 = render_prompt(model, turn1), render_prompt(model, turn2)
    params = SamplingParams(temperature=0.0, max_tokens=4)

    def direct(ids):
        return engine.submit(EngineRequest(ids, params)).result().timings

    engine.clear_prefix_cache()
    direct(ids1)
    warm = direct(ids2)
    engine.clear_prefix_cache()
    direct(ids1)
    with httpx.Client(timeout=600) as c:
        t = time.perf_counter()
        body = {"messages": turn2, "max_tokens": 4, "temperature": 0.0, "stream": True}
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            http_ttft = None
            for line in r.iter_lines():
                if line.startswith("data: {") and '"role"' not in line and http_ttft is None:
                    http_ttft = time.perf_counter() - t  # the first event after the role event
    engine.clear_prefix_cache()
    cold = direct(ids2)
    return {"history_tokens": len(ids1), "turn2_prompt_tokens": len(ids2), "cached_tokens": warm.cached_tokens,
            "ttft_s_direct": round(warm.ttft_s, 4), "ttft_s_http": round(http_ttft or 0.0, 4),
            "ttft_s_cold": round(cold.ttft_s, 4)}


# ---- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="converted model folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--history", type=int, default=2048, help="tokens of the 1st turn (2nd-turn TTFT)")
    ap.add_argument("--reps", type=int, default=2, help="alternated direct/HTTP runs per stream count")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    context = max(a.history + 256, 1024)
    settings = EngineSettings(slots=max(streams), context=context, threads=a.threads)
    load_before = machine_load()
    engine = Engine.load(a.model, settings)
    server = Server(engine)
    clients = Clients(server.url)
    try:
        run_direct(engine, prompts(engine.model, 1), 4)  # warm-up: kernels, then the HTTP path
        run_http(server, clients, prompts(engine.model, 1), 4, engine)
        rows = {}
        for b in streams:
            ids = prompts(engine.model, b)
            direct, http = [], []
            for _ in range(a.reps):
                direct.append(run_direct(engine, ids, a.tokens))
                http.append(run_http(server, clients, ids, a.tokens, engine))
            best_direct = min(r["wall_s"] for r in direct)
            best_http = min(r["wall_s"] for r in http)
            rows[b] = {"aggregate_tok_s": round(max(r["aggregate_tok_s"] for r in direct), 3),
                       "wall_s_direct": round(best_direct, 4), "wall_s_http": round(best_http, 4),
                       "http_overhead": round(best_http / best_direct - 1, 4)}
            cpu = [r["server_cpu_s"] for r in http if r["server_cpu_s"] is not None]
            if cpu:
                rows[b]["server_cpu_us_per_token"] = round(1e6 * min(cpu) / (b * a.tokens), 1)
                rows[b]["http_overhead_cpu"] = round(min(cpu) / best_direct, 4)
        one = rows[streams[0]]["aggregate_tok_s"]
        for row in rows.values():
            row["speedup_vs_1"] = round(row["aggregate_tok_s"] / one, 3) if one else 0.0
        turn = second_turn(engine, server.url, a.history)
    finally:
        clients.close()
        server.close()
        engine.close(drain=False)
    result = {"model": str(a.model), "threads": a.threads, "tokens_per_stream": a.tokens,
              "cpu_count": os.cpu_count(), "machine_load_before": load_before, "streams": rows, "second_turn": turn}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"saved {a.out}")


def print_table(r: dict) -> None:
    print(f"model {r['model']}, {r['threads']} threads, {r['tokens_per_stream']} tokens per stream")
    print(f"{'streams':>7} {'tok/s':>9} {'x single':>9} {'direct s':>9} {'HTTP s':>8} {'HTTP +%':>8} "
          f"{'server us/tok':>14} {'server CPU %':>13}")
    for b, row in r["streams"].items():
        cpu = row.get("http_overhead_cpu")
        print(f"{b:>7} {row['aggregate_tok_s']:>9.2f} {row['speedup_vs_1']:>9.2f} {row['wall_s_direct']:>9.3f} "
              f"{row['wall_s_http']:>8.3f} {100 * row['http_overhead']:>8.1f} "
              f"{row.get('server_cpu_us_per_token', float('nan')):>14.0f} {100 * (cpu or float('nan')):>13.2f}")
    t = r["second_turn"]
    print(f"2nd turn after {t['history_tokens']} tokens ({t['cached_tokens']} reused): TTFT {t['ttft_s_direct']:.3f} s "
          f"direct, {t['ttft_s_http']:.3f} s HTTP, {t['ttft_s_cold']:.3f} s cold")


if __name__ == "__main__":
    main()
