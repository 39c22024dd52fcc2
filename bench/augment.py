"""Augmentation generation speed: a naive one-prompt-at-a-time HF `generate` loop vs kinject's
batched transformers engine vs the vLLM engine (when vllm imports), same plan, same model, one run.

The plan is the first chunk the augmentation planner makes over demo documents x SPA's seven types:
the same requests (chat prompts, temperature 1, top_p 0.95, a seed per sample) go to all three.
tokens/s = completion tokens generated / wall seconds, with every model loaded (and vLLM started)
before its clock starts. Target: each engine >= 4x the naive loop.

Run: `python -m bench.augment [--quick]` (the `__main__` guard matters: vLLM spawns its engine
process, which re-imports the main module).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plan_requests(settings, n: int):
    """n requests: the augmentation plan's first chunk over the demo corpus, built as augment does."""
    from kinject.augment.generate import Generator
    from kinject.augment.plan import Planner
    from kinject.augment.run import selected_types
    from kinject.ingest.readers import read_corpus

    docs, _ = read_corpus(REPO / "demo" / "corpus", settings.ingest)
    docs = sorted(docs, key=lambda d: d.doc_id)[: max(1, n // 7 + 1)]
    by_id = {d.doc_id: d for d in docs}
    planner = Planner(list(by_id), selected_types(settings), n * settings.augment.max_new_tokens, n, settings.augment.max_new_tokens, settings.seed)
    gen = Generator.open(settings)
    return [gen.request(by_id[p.doc_id], p) for p in planner.next_chunk()]


def naive_loop(settings, requests) -> tuple[int, float]:
    """One request at a time through `model.generate`, the way a plain script would do it."""
    import torch

    from kinject.core.engines.base import render_prompt
    from kinject.core.models import load_causal_lm

    model, tok = load_causal_lm(settings.models.llm, settings)
    tokens = 0
    t0 = time.perf_counter()
    for r in requests:
        enc = tok(render_prompt(tok, r), return_tensors="pt", add_special_tokens=False).to(model.device)
        torch.manual_seed(r.params.seed)
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=True, temperature=r.params.temperature, top_p=r.params.top_p, top_k=0,
                max_new_tokens=r.params.max_new_tokens, pad_token_id=tok.pad_token_id,
            )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        tokens += len([t for t in new if t not in (tok.eos_token_id, tok.pad_token_id)])
    seconds = time.perf_counter() - t0
    del model
    return tokens, seconds


def engine_run(settings, requests, backend: str) -> tuple[int, float]:
    from kinject.core.engines import make_engine

    engine = make_engine(settings.model_copy(update={"engine": settings.engine.model_copy(update={"backend": backend})}))
    try:
        if hasattr(engine, "start"):
            engine.start()  # vLLM: start the engine process before the clock
        engine.generate(requests[:1])  # warm-up
        t0 = time.perf_counter()
        outs = engine.generate(requests)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    return sum(g.completion_tokens for g in outs), seconds


def run(quick: bool = False) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kinject.core.settings import SPA_TYPES, load_settings

    n, max_new = (8, 32) if quick else (32, 64)
    settings = load_settings({"augment": {"types": SPA_TYPES, "max_new_tokens": max_new}, "engine": {"max_batch_size": n, "vllm_cpu_kvcache_gb": 1}})
    requests = plan_requests(settings, n)
    result: dict = {"quick": quick, "requests": len(requests), "max_new_tokens": max_new, "model": settings.models.llm, "target": ">=4"}

    def measure(name: str, fn) -> float:
        tokens, seconds = fn()
        result[f"{name}_tokens"] = tokens
        result[f"{name}_seconds"] = round(seconds, 2)
        result[f"{name}_tok_s"] = round(tokens / seconds, 2)
        return tokens / seconds

    naive = measure("naive", lambda: naive_loop(settings, requests))
    batched = measure("batched", lambda: engine_run(settings, requests, "transformers"))
    result["batched_speedup"] = round(batched / naive, 2)
    if importlib.util.find_spec("vllm") is not None:
        vllm = measure("vllm", lambda: engine_run(settings, requests, "vllm"))
        result["vllm_speedup"] = round(vllm / naive, 2)
    else:
        result["vllm_skipped"] = "vllm is not installed"
    try:
        result["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    out = run(quick="--quick" in sys.argv)
    print(f"{out['requests']} requests x <= {out['max_new_tokens']} new tokens on {out['model']}:")
    for name in ("naive", "batched", "vllm"):
        if f"{name}_tok_s" in out:
            print(f"  {name:8s} {out[f'{name}_tokens']:6d} tokens in {out[f'{name}_seconds']:7.2f} s = {out[f'{name}_tok_s']:7.2f} tok/s")
    print(f"  batched / naive = {out['batched_speedup']}x" + (f"; vllm / naive = {out['vllm_speedup']}x" if "vllm_speedup" in out else f"; vllm: {out.get('vllm_skipped')}") + " (target >= 4x)")
