"""Bounded load on loopback: 16 concurrent streaming clients over the four modes against
`kinject serve` in a child process, in two equal rounds (requests started for 3 s each, a hard
cap on the requests). Prints requests/s and latency percentiles; asserts no errors and that the
server's peak resident memory in the second round stays within a bound of its peak in the first.
Before the rounds, every prompt they can send is asked once, so the server's prompt cache already
holds them all: otherwise the second round meets pairs the first did not and the cache's growth
(a few MB per prompt, by design) reads as a leak. Peaks, not the memory at a round's end: whether
glibc has handed a round's freed memory back by then varies by tens of MB. Then a burst of more
clients than its slots and queue hold at once: the rest get 503s with Retry-After, and the server
answers normally afterwards.

The server runs with MALLOC_ARENA_MAX=2. With glibc's default (up to 8 malloc arenas per core,
one per busy thread) its RSS swings by 100-200 MB from round to round with no leak at all; with
two arenas the peak moved by 0-57 MB between rounds here. The bound is 100 MB: keeping a copy of
each request's prompt KV (8 MB a request on average) grew the peak by 237 MB in one round.
"""
from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from conftest import copy_kb
from test_api_abuse import error_of, kinject_serve

pytestmark = pytest.mark.slow

CLIENTS = 16
# Requests start for ROUND_S seconds; a round lasts until the last one is answered. On the
# single-threaded server here a rag answer is mostly prompt prefill, so the 16 clients' last
# requests take about as long again to drain (one passage per rag prompt keeps that short).
ROUND_S = 3.0
MAX_REQUESTS = 1000  # per round, whatever the speed
MAX_TOKENS = 4
MODES = ["kinject-base", "kinject-rag", "kinject-ft", "kinject-ft-rag"]
QUESTIONS = [
    "Who founded the Brightwater glassworks?",
    "What do the harbour wardens do?",
    "When is the Night of Drifting Lanterns held?",
    "What colour is Brightwater glass?",
]
RSS_GROWTH_LIMIT_MB = 100
MAX_CONCURRENCY, MAX_QUEUE = 4, 20  # the 16 clients above always fit; the burst below does not
BURST = 64


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def run_round(client: openai.OpenAI, pid: int, seconds: float, cap: int) -> dict:
    """CLIENTS threads, each streaming one request after another, until time or the cap is up;
    the server's RSS is sampled meanwhile."""
    lock = threading.Lock()
    started = [0]
    latencies, first_tokens, errors, modes_done = [], [], [], {}
    end = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            with lock:
                if started[0] >= cap:
                    return
                started[0] += 1
            mode = MODES[(i + n) % len(MODES)]
            question = QUESTIONS[(i * 7 + n) % len(QUESTIONS)]
            n += 1
            t0 = time.monotonic()
            first = None
            try:
                finish = None
                for chunk in client.chat.completions.create(
                    model=mode, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, stream=True
                ):
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.monotonic() - t0
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                if finish not in ("stop", "length"):
                    raise AssertionError(f"stream ended without a finish_reason ({finish!r})")
            except Exception as e:  # counted, and shown below
                with lock:
                    errors.append(f"{mode}: {type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.monotonic() - t0)
                if first is not None:
                    first_tokens.append(first)
                modes_done[mode] = modes_done.get(mode, 0) + 1

    rss, done = [rss_mb(pid)], threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.25):
            rss.append(rss_mb(pid))

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.monotonic() - t0
    done.set()
    sampler.join()

    def p(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))

    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "p50_s": p(latencies, 50),
        "p95_s": p(latencies, 95),
        "p95_first_token_s": p(first_tokens, 95),
        "modes": modes_done,
        "rss_peak_mb": max(rss),
        "rss_end_mb": rss_mb(pid),
    }


def warm_up(client: openai.OpenAI) -> None:
    """Every (mode, question) pair the rounds can send, once each and concurrently: the adapter and
    the retriever are loaded, and every prompt is in the server's prompt cache (which keeps each
    distinct prompt's KV, megabytes each, up to engine.prompt_cache_mb), so the rounds' growth is
    not the cache filling."""
    pairs = [(m, q) for m in MODES for q in QUESTIONS]
    with ThreadPoolExecutor(len(pairs)) as pool:
        list(pool.map(lambda mq: client.chat.completions.create(model=mq[0], messages=[{"role": "user", "content": mq[1]}], max_tokens=2), pairs))


@pytest.fixture(scope="module")
def server(demo_index_lora, tmp_path_factory):
    """(url, pid) of `kinject serve` on a copy of the demo KB with all four modes."""
    tmp = tmp_path_factory.mktemp("load")
    kb_root = tmp / "kbs"
    copy_kb(demo_index_lora, kb_root, "demo")
    env = {"MALLOC_ARENA_MAX": "2"}
    sets = ("retrieval.top_k=1", f"serve.max_concurrency={MAX_CONCURRENCY}", f"serve.max_queue={MAX_QUEUE}")
    with kinject_serve(kb_root, tmp / "serve.log", *sets, env=env) as (url, pid):
        yield url, pid


def test_sixteen_streaming_clients_no_errors_and_flat_memory(server):
    url, pid = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    warm_up(client)
    before = rss_mb(pid)
    rounds = [run_round(client, pid, ROUND_S, MAX_REQUESTS) for _ in range(2)]
    assert client.models.list().data  # still answering

    print(f"\n{CLIENTS} streaming clients, max_tokens={MAX_TOKENS}, modes {', '.join(MODES)}; server RSS after warm-up {before:.0f} MB")
    for i, r in enumerate(rounds, 1):
        print(
            f"round {i}: {r['requests']} requests in {r['wall_s']:.1f} s = {r['rps']:.2f} req/s; latency p50 {r['p50_s']:.2f} s, "
            f"p95 {r['p95_s']:.2f} s, first token p95 {r['p95_first_token_s']:.2f} s; {len(r['errors'])} errors; RSS peak {r['rss_peak_mb']:.0f} MB, at the end {r['rss_end_mb']:.0f} MB; {r['modes']}"
        )
    growth = rounds[1]["rss_peak_mb"] - rounds[0]["rss_peak_mb"]
    print(f"RSS peak growth from round 1 to round 2: {growth:+.1f} MB (limit {RSS_GROWTH_LIMIT_MB} MB)")
    for r in rounds:
        assert not r["errors"], r["errors"][:5]
        assert r["requests"] >= CLIENTS and set(r["modes"]) == set(MODES)
    assert growth < RSS_GROWTH_LIMIT_MB


def test_a_burst_past_the_queue_gets_503s_with_retry_after(server):
    """BURST clients at once against MAX_CONCURRENCY slots and MAX_QUEUE places: the ones that
    find no place are refused at once with 503 server_busy and Retry-After; every other one is
    answered; then the server is idle and answers as before."""
    url, _ = server
    body = {"model": "kinject-base", "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 2}
    gate = threading.Barrier(BURST)
    results: list[httpx.Response | Exception] = [None] * BURST  # type: ignore[list-item]

    def one(i: int) -> None:
        gate.wait()
        try:
            results[i] = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        except Exception as e:  # shown below
            results[i] = e

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.monotonic() - t0
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed[:3]
    busy = [r for r in results if r.status_code == 503]
    ok = [r for r in results if r.status_code == 200]
    print(f"\nburst of {BURST}: {len(ok)} answered, {len(busy)} refused with 503 in {wall:.1f} s")
    assert len(ok) + len(busy) == BURST, sorted({r.status_code for r in results})
    assert len(ok) >= MAX_CONCURRENCY + MAX_QUEUE and busy
    for r in busy:
        assert error_of(r)["code"] == "server_busy" and r.headers.get("retry-after") == "1", (r.headers, r.text)
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["active"] == health["waiting"] == 0
    again = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
