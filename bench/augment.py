"""Augmentation generation speed: a naive one-prompt-at-a-time HF `generate` loop vs kinject's
batched transformers engine vs the vLLM engine (when vllm imports), same prompts, same model, one run.

The plan is realistic: D demo documents x SPA's seven types, one sample each, at the augment
stage's own max_new_tokens (256; quick mode: 2 documents x 64 tokens), built by the augmentation
planner and `Generator.request` exactly as `kinject augment` builds them (chat prompts that put the
document first, so all seven types of a document share their prefix; temperature 1, top_p 0.95, a
seed per sample). The engines get the whole plan in one `generate` call, as augment does with
`samples_per_call` covering it.
Baseline: the same prompts with the same token budget through `model.generate`, one at a time. In
full mode it runs every third request of the plan (14 of 42, every type twice) rather than all:
a one-prompt loop's tokens/s does not depend on how many prompts follow, and the whole plan would
take it most of an hour. tokens/s = completion tokens generated / wall seconds, with every model
loaded (and vLLM started) before its clock starts. Targets: batched >= 4x, vLLM >= 8x the loop.

Run: `python -m bench.augment [--quick] [--engines vllm,transformers]` (the `__main__` guard
matters: vLLM spawns its engine process, which re-imports the main module).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plan_requests(settings, n_docs: int):
    """n_docs demo documents x the selected types, one sample each: the augmentation plan's first
    chunk over those documents, built as augment builds it."""
    from kinject.augment.generate import Generator
    from kinject.augment.plan import Planner
    from kinject.augment.run import selected_types
    from kinject.ingest.readers import read_corpus

    docs, _ = read_corpus(REPO / "demo" / "corpus", settings.ingest)
    docs = sorted(docs, key=lambda d: d.doc_id)[:n_docs]
    by_id = {d.doc_id: d for d in docs}
    types = selected_types(settings)
    n = len(docs) * len(types)
    max_new = settings.augment.max_new_tokens
    planner = Planner(list(by_id), types, n * max_new, n, max_new, settings.seed)
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

    engine = make_engine(settings.model_copy(update={"engine": settings.engine.model_copy(update={"backend": backend})}), lora=False)  # as augment makes it
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


ENGINES = ("transformers", "vllm")


def run(quick: bool = False, engines: tuple[str, ...] = ENGINES) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kinject.core.settings import SPA_TYPES, load_settings

    n_docs, max_new, naive_every = (2, 64, 1) if quick else (6, 256, 3)
    settings = load_settings({"augment": {"types": SPA_TYPES, "max_new_tokens": max_new}, "engine": {"max_batch_size": n_docs * len(SPA_TYPES), "vllm_cpu_kvcache_gb": 1}})
    requests = plan_requests(settings, n_docs)
    naive_requests = requests[::naive_every]
    result: dict = {
        "quick": quick, "documents": n_docs, "types": len(SPA_TYPES), "requests": len(requests), "max_new_tokens": max_new,
        "naive_requests": len(naive_requests), "model": settings.models.llm,
    }

    def measure(name: str, fn) -> float:
        tokens, seconds = fn()
        result[f"{name}_tokens"] = tokens
        result[f"{name}_seconds"] = round(seconds, 2)
        result[f"{name}_tok_s"] = round(tokens / seconds, 2)
        return tokens / seconds

    naive = measure("naive", lambda: naive_loop(settings, naive_requests))
    if "transformers" in engines:
        batched = measure("batched", lambda: engine_run(settings, requests, "transformers"))
        result["batched_speedup"] = round(batched / naive, 2)
        result["batched_speedup_target"] = ">=4"
    if "vllm" in engines:
        if importlib.util.find_spec("vllm") is not None:
            vllm = measure("vllm", lambda: engine_run(settings, requests, "vllm"))
            result["vllm_speedup"] = round(vllm / naive, 2)
            result["vllm_speedup_target"] = ">=8"
        else:
            result["vllm_skipped"] = "vllm is not installed"
    try:
        result["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    chosen = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--engines=")), ",".join(ENGINES))
    out = run(quick="--quick" in sys.argv, engines=tuple(e for e in chosen.split(",") if e))
    print(
        f"{out['requests']} requests ({out['documents']} documents x {out['types']} types) x <= {out['max_new_tokens']} new tokens "
        f"on {out['model']}; the one-prompt loop ran {out['naive_requests']} of them:"
    )
    for name in ("naive", "batched", "vllm"):
        if f"{name}_tok_s" in out:
            print(f"  {name:8s} {out[f'{name}_tokens']:6d} tokens in {out[f'{name}_seconds']:7.2f} s = {out[f'{name}_tok_s']:7.2f} tok/s")
    if "batched_speedup" in out:
        print(f"  batched / naive = {out['batched_speedup']}x (target >= 4x)")
    if "vllm_speedup" in out:
        print(f"  vllm / naive = {out['vllm_speedup']}x (target >= 8x)")
    elif "vllm_skipped" in out:
        print(f"  vllm: {out['vllm_skipped']}")
