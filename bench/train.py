"""Packed training vs SPA-style padding: useful (non-pad) tokens per second.

Same model (the configured LLM with kinject's LoRA), same data (the demo corpus's documents),
same number of optimizer steps of one 2048-token sequence each. kinject packs the samples end to
end, so every position is a real token; SPA pads each sample to a fixed 2048-token window, so most
of each step's compute goes to padding. Run: `python -m bench.train [--quick]`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WINDOW = 2048


def demo_texts() -> list[str]:
    import re

    out = []
    for p in sorted((REPO / "demo" / "corpus").iterdir()):
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".html":
            from bs4 import BeautifulSoup

            soup = BeautifulSoup(text, "html.parser")
            for tag in soup(["script", "style"]):
                tag.decompose()
            text = soup.get_text("\n")
        out.append(re.sub(r"\n\s*\n+", "\n\n", text).strip())
    return out


def _time_steps(model, optimizer, batches, device) -> tuple[float, int]:
    """Seconds and useful tokens over batches[1:], one optimizer step each; batches[0] warms up."""
    import torch

    def step(batch):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    useful, t0 = 0, time.perf_counter()
    for b in batches[1:]:
        step(b)
        useful += int(b["attention_mask"].sum())
    return time.perf_counter() - t0, useful


def run(quick: bool = False) -> dict:
    import torch

    from kinject.core.models import load_causal_lm, pick_device
    from kinject.core.settings import load_settings
    from kinject.finetune.data import pack
    from kinject.finetune.lora import trainable_model

    settings = load_settings()
    steps = 2 if quick else 5
    torch.manual_seed(settings.seed)
    base, tok = load_causal_lm(settings.models.llm, settings)
    model = trainable_model(base, settings)
    model.train()
    device = pick_device(settings.engine.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    texts = demo_texts()
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    blocks, _ = pack(ids * (1 + (steps + 1) * WINDOW // sum(map(len, ids))), WINDOW, tok.eos_token_id)
    packed = [{"input_ids": torch.tensor([b]), "attention_mask": torch.ones(1, WINDOW, dtype=torch.long)} for b in blocks[: steps + 1]]
    padded = []
    for i in range(steps + 1):
        sample = (ids[i % len(ids)] + [tok.eos_token_id])[:WINDOW]
        n = len(sample)
        padded.append(
            {
                "input_ids": torch.tensor([sample + [tok.pad_token_id] * (WINDOW - n)]),
                "attention_mask": torch.tensor([[1] * n + [0] * (WINDOW - n)]),
            }
        )

    pad_s, pad_useful = _time_steps(model, optimizer, padded, device)
    pack_s, pack_useful = _time_steps(model, optimizer, packed, device)
    pad_tps, pack_tps = pad_useful / pad_s, pack_useful / pack_s
    result = {
        "name": "train",
        "metric": "useful (non-pad) training tokens per second",
        "device": device,
        "model": settings.models.llm,
        "window": WINDOW,
        "steps": steps,
        "avg_sample_tokens": round(sum(map(len, ids)) / len(ids), 1),
        "spa_padded_tokens_per_s": round(pad_tps, 1),
        "kinject_packed_tokens_per_s": round(pack_tps, 1),
        "ratio": round(pack_tps / pad_tps, 2),
        "target_ratio": 1.5,
    }
    result["meets_target"] = result["ratio"] >= result["target_ratio"]
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = run(quick="--quick" in sys.argv)
    for k, v in out.items():
        print(f"{k:30s} {v}")
    print(json.dumps(out))
