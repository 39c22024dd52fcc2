"""Serving: what the service adds on top of the engine, and how it holds up under 16 clients.

Overhead: for the same questions, the latency of the `rag` chat endpoint (HTTP + retrieval +
prompt building + generation) against the raw engine generating from the very same final prompt
(built by Answerer.prepare, as the endpoint builds it), greedy, alternating which goes first.
overhead_ratio = (endpoint - engine) / endpoint, summed over the questions; target <= 0.10.
Concurrency: 16 clients stream `rag` answers for a bounded time (no new request after the
deadline): requests/s, p50/p95 time to first token, errors (target 0), and the speed-up of
requests/s over one client at a time (measured in the overhead phase). The clients cycle through
the same questions as the overhead phase, whose warm-ups have already prefilled each: on an engine
that keeps prompts' KV, both phases reuse it, and the speed-up measures batching alone.
Both on the transformers engine and, when vLLM is importable, on the vLLM engine. The server is
the real one (uvicorn on a loopback port) on a KB built from the demo corpus.

Run: `python -m bench.serve [--quick] [--engines=transformers,vllm]`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from kinject.core.answer import model_id

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 16
RAG = model_id("rag")


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "demo" / "questions.jsonl").read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows if r.get("split") == "dev"][:n]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


class Server:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def measure_overhead(url: str, answerer, qs: list[str], max_tokens: int) -> dict:
    import httpx

    from kinject.core.engines import SamplingParams

    endpoint_s, engine_s, mismatched = [], [], 0
    with httpx.Client(timeout=600) as http:
        for i, q in enumerate(qs):
            conv = [{"role": "user", "content": q}]
            body = {"model": RAG, "messages": conv, "max_tokens": max_tokens, "temperature": 0}

            def endpoint() -> dict:
                t0 = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json=body)
                endpoint_s.append(time.perf_counter() - t0)
                r.raise_for_status()
                return r.json()

            prepared = answerer.prepare("rag", conv, SamplingParams(max_new_tokens=max_tokens))
            # An engine that keeps prompts' KV (vLLM's prefix caching, the continuous batcher's
            # prompt cache) would prefill only the first of the pair: both run after a warm-up.
            answerer.engine.generate([dataclasses.replace(prepared.request, params=SamplingParams(max_new_tokens=1))])

            def engine():
                t0 = time.perf_counter()
                g = answerer.engine.generate([prepared.request])[0]
                engine_s.append(time.perf_counter() - t0)
                return g

            if i % 2:
                g, resp = engine(), endpoint()
            else:
                resp, g = endpoint(), engine()
            if resp["usage"]["completion_tokens"] != g.completion_tokens:
                mismatched += 1  # would mean the endpoint did not answer the same prompt
    total_e, total_g = sum(endpoint_s), sum(engine_s)
    return {
        "questions": len(qs),
        "max_tokens": max_tokens,
        "endpoint_mean_s": round(total_e / len(qs), 3),
        "engine_mean_s": round(total_g / len(qs), 3),
        "overhead_mean_ms": round(1000 * (total_e - total_g) / len(qs), 1),
        "overhead_p50_ms": round(1000 * statistics.median(e - g for e, g in zip(endpoint_s, engine_s)), 1),
        "overhead_ratio": round(max(0.0, total_e - total_g) / total_e, 4),
        "overhead_ratio_target": "<=0.10",
        "answers_differing_in_length": mismatched,
        "single_client_rps": round(len(qs) / total_e, 3),
        "endpoint_engine_pairs_s": [[round(e, 3), round(g, 3)] for e, g in zip(endpoint_s, engine_s)],
    }


async def _client(http, url: str, qs: list[str], offset: int, deadline: float, max_tokens: int, out: dict) -> None:
    i = offset
    while time.perf_counter() < deadline:
        body = {
            "model": RAG,
            "messages": [{"role": "user", "content": qs[i % len(qs)]}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        i += 1
        t0 = time.perf_counter()
        ttft = None
        try:
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    out["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["errors"].append(chunk["error"]["message"])
                        break
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        ttft = time.perf_counter() - t0
        except Exception as e:  # counted, not raised: the benchmark reports errors
            out["errors"].append(f"{type(e).__name__}: {e}")
            continue
        out["latency"].append(time.perf_counter() - t0)
        if ttft is not None:
            out["ttft"].append(ttft)


def measure_concurrency(url: str, qs: list[str], seconds: float, max_tokens: int) -> dict:
    import httpx

    out: dict = {"errors": [], "ttft": [], "latency": []}

    async def main() -> float:
        limits = httpx.Limits(max_connections=CLIENTS + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            t0 = time.perf_counter()
            deadline = t0 + seconds
            await asyncio.gather(*(_client(http, url, qs, k, deadline, max_tokens, out) for k in range(CLIENTS)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    done = len(out["latency"])
    return {
        "clients": CLIENTS,
        "launch_window_s": seconds,
        "wall_s": round(wall, 2),
        "requests": done,
        "requests_per_s": round(done / wall, 3),
        "ttft_p50_s": round(percentile(out["ttft"], 0.5), 3),
        "ttft_p95_s": round(percentile(out["ttft"], 0.95), 3),
        "latency_p50_s": round(percentile(out["latency"], 0.5), 3),
        "errors": len(out["errors"]),
        "errors_target": 0,
        "first_errors": out["errors"][:3],
    }


def bench_engine(backend: str, kb_name: str, overrides: dict, quick: bool) -> dict:
    from kinject.core.engines import make_engine
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.service.app import create_app

    settings = load_settings({**overrides, "engine": {**overrides.get("engine", {}), "backend": backend}})
    kb = KB.open(settings, kb_name)
    t0 = time.perf_counter()
    engine = make_engine(settings)
    load_s = time.perf_counter() - t0
    try:
        app = create_app(kb, settings, engine)
        answerer = app.state.kinject.answerer
        qs = questions(6 if quick else 16)
        max_tokens = 32 if quick else 64
        with Server(app) as server:
            warm = {"model": RAG, "messages": [{"role": "user", "content": qs[0]}], "max_tokens": 4}
            import httpx

            httpx.post(server.url + "/v1/chat/completions", json=warm, timeout=600).raise_for_status()
            overhead = measure_overhead(server.url, answerer, qs, max_tokens)
            # The same answer length as the one-client phase, so the speed-up compares like with like.
            conc = measure_concurrency(server.url, qs, 20 if quick else 60, max_tokens)
        conc["rps_speedup_vs_one_client"] = round(conc["requests_per_s"] / overhead["single_client_rps"], 2)
        if backend == "transformers":  # the target is the default engine's
            conc["rps_speedup_vs_one_client_target"] = ">=3"
        return {"engine_load_s": round(load_s, 1), **overhead, "concurrency": conc}
    finally:
        engine.close()


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and (REPO / "core" / "engines" / "vllm_engine.py").exists()


def run(quick: bool, engines: tuple[str, ...] = ("transformers", "vllm")) -> dict:
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.ingest.pipeline import ingest

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="kinject-bench-serve-") as tmp:
        overrides = {"kb_root": str(Path(tmp) / "kbs"), "engine": {"vllm_cpu_kvcache_gb": 1}}  # RAM is shared
        settings = load_settings(overrides)
        ingest(KB.create(settings, "bench"), REPO / "demo" / "corpus", settings, progress=False)
        result: dict = {"kb": "demo/corpus"}
        result["transformers"] = bench_engine("transformers", "bench", overrides, quick) if "transformers" in engines else {"skipped": "not asked for"}
        if "vllm" not in engines:
            result["vllm"] = {"skipped": "not asked for"}
        elif vllm_available():
            try:
                result["vllm"] = bench_engine("vllm", "bench", overrides, quick)
            except Exception as e:  # reported, so the transformers numbers still count
                result["vllm"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            result["vllm"] = {"skipped": "vllm or core/engines/vllm_engine.py is not installed"}
    return result


def _print(name: str, r: dict) -> None:
    if "overhead_ratio" not in r:
        print(f"{name}: {r}")
        return
    c = r["concurrency"]
    print(
        f"{name}: endpoint {r['endpoint_mean_s']} s vs engine {r['engine_mean_s']} s per rag answer "
        f"({r['max_tokens']} tokens max): overhead {r['overhead_mean_ms']} ms = {100 * r['overhead_ratio']:.1f}% (target <= 10%)"
    )
    print(
        f"{name}: {c['clients']} streaming clients for {c['launch_window_s']} s: {c['requests']} requests, "
        f"{c['requests_per_s']} req/s ({c['rps_speedup_vs_one_client']}x one client{', target >= 3x' if 'rps_speedup_vs_one_client_target' in c else ''}), TTFT p50 {c['ttft_p50_s']} s "
        f"p95 {c['ttft_p95_s']} s, errors {c['errors']} (target 0)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    asked = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--engines=")]
    out = run(quick="--quick" in sys.argv, engines=tuple(asked[0].split(",")) if asked else ("transformers", "vllm"))
    for engine_name in ("transformers", "vllm"):
        _print(engine_name, out[engine_name])
