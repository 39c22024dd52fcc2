"""How much a synthetic sample would teach the adapter: optimizer-aware gradient influence.

A sample's worth to training cannot be read from its text, so it is measured on the model: the
gradient of the LoRA parameters on the sample, shaped as Adam would apply it, against the gradient
of a target objective (LESS, Xia et al. 2024). The score is a cosine in [-1, 1]; higher means a
step on the sample lowers the target loss more.

- Target objective: by default cloze items cut from the KB's own documents (a sentence with one
  name, number or date blanked out, asked in the service's closed-book chat format, loss on the
  answer only), worded unlike any training sample; or the user's example questions
  (`influence.target_questions`), which the eval then refuses to score.
- Optimizer-aware: a short Adam warm-up of a fresh LoRA on the KB's documents gives the second
  moments v; a sample's gradient g becomes Adam's step direction g / (sqrt(v') + eps), with v'
  updated by g itself. The warm-up reads the documents, not the candidates, so a sample's score
  does not depend on which other samples are scored with it (scores stay cacheable across runs
  and across the rounds of the generation bandit). Adam's first moment is left out: it is the
  same for every sample and would add the warm-up data's direction to all of them.
- Tractable on CPU: the flattened LoRA gradient (about 4.9M numbers for the 135M model at rank
  16) is projected to `influence.dims` numbers by a CountSketch: every coordinate is added, with
  a seeded random sign, into one seeded random bucket. That costs one pass over the gradient,
  O(params), where a dense Gaussian projection would cost params x dims multiply-adds per sample
  (40 G for 8,192 dims), and it preserves inner products in expectation, which is all a cosine needs.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from kinject.core.cloze import blank_one_span, cloze_sentences
from kinject.core.errors import KinjectError
from kinject.core.files import append_jsonl, jsonl_values, read_jsonl, sha256_text
from kinject.core.settings import Settings

# Bump when the estimator's arithmetic changes, so cached scores of the old one are recomputed.
ESTIMATOR_VERSION = "1"
_ADAM_BETA2, _ADAM_EPS = 0.999, 1e-8


class InfluenceError(KinjectError):
    pass


@dataclass(frozen=True)
class TargetItem:
    question: str
    answer: str
    source: str  # "corpus" (a held-back cloze item) or "user" (--target-questions)


# ---- the target objective -----------------------------------------------------------------
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_SPAN = re.compile(
    rf"{_MONTH}\s+\d{{1,2}},?\s+\d{{3,4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{3,4}}|{_MONTH}\s+\d{{3,4}}"
    r"|\b\d[\d,.]*\d\b|\b\d\b"
    r"|(?<![.!?]\s)(?<!^)\b[A-Z][\w'’-]+(?:\s+(?:of|the|de|and)?\s*[A-Z][\w'’-]+)*"
)


def corpus_targets(documents: list, n: int, seed: int) -> list[TargetItem]:
    """Up to `n` cloze items over the documents, spread evenly over them: a sentence with one
    name, number or date blanked out, answered by that span. The answer stands in the sentence
    by construction, so every item is verified against the corpus."""
    rng = random.Random(f"{seed}:influence-target")
    per_doc: list[list[TargetItem]] = []
    for d in documents:
        sentences = cloze_sentences(" ".join(d.text.split()))
        rng.shuffle(sentences)
        items = []
        for s in sentences:
            cut = blank_one_span(s, _SPAN, rng, "___")
            if cut is None:
                continue
            blanked, answer = cut
            items.append(TargetItem(f'Complete this sentence from "{d.title}": {blanked}', answer, "corpus"))
        per_doc.append(items)
    out: list[TargetItem] = []
    depth = 0
    while len(out) < n and any(len(items) > depth for items in per_doc):
        out += [items[depth] for items in per_doc if len(items) > depth][: n - len(out)]
        depth += 1
    return out


def read_target_questions(path: str | Path) -> list[TargetItem]:
    """The user's example questions: JSONL of {"question": ..., "answer": ...} (eval's format)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InfluenceError(f"cannot read the target questions file {path}: {e}") from None
    items = []
    for i, row in jsonl_values(lines, path, InfluenceError):
        q, a = (row.get("question"), row.get("answer")) if isinstance(row, dict) else (None, None)
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise InfluenceError(f"{path} line {i}: a target question needs non-empty \"question\" and \"answer\" strings")
        items.append(TargetItem(q.strip(), a.strip(), "user"))
    if not items:
        raise InfluenceError(f"{path} holds no target questions")
    return items


def target_items(settings: Settings, documents: list) -> list[TargetItem]:
    cfg = settings.influence
    if cfg.target_questions:
        return read_target_questions(cfg.target_questions)
    items = corpus_targets(documents, cfg.target_items, settings.seed)
    if not items:
        raise InfluenceError("the documents hold no sentence with a name, number or date to build the target objective from: pass influence.target_questions")
    return items


def normalize_question(text: str) -> str:
    """How the eval recognises a target question among its own."""
    return " ".join(re.findall(r"\w+", text.lower()))


# ---- the estimator ------------------------------------------------------------------------
class CountSketch:
    """x (n numbers) -> y (dims numbers), y[h(i)] += s(i) x[i], with seeded h and s."""

    def __init__(self, n: int, dims: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.bucket = torch.randint(0, dims, (n,), generator=g)
        self.sign = torch.randint(0, 2, (n,), generator=g).float().mul_(2).sub_(1)

    def __call__(self, x):
        import torch

        return torch.zeros(self.dims, dtype=torch.float32).index_add_(0, self.bucket, x.float() * self.sign)


def estimator_fingerprint(settings: Settings, documents: list, targets: list[TargetItem]) -> str:
    """What a score depends on: cached scores with another fingerprint are recomputed."""
    t, cfg = settings.train, settings.influence
    return sha256_text(json.dumps({
        "version": ESTIMATOR_VERSION,
        "llm": settings.models.llm,
        "lora": [t.lora_rank, t.lora_alpha, t.target_modules, t.lr],
        "influence": [cfg.dims, cfg.max_tokens, cfg.warmup_steps],
        "seed": settings.seed,
        "documents": [d.content_hash for d in documents],
        "targets": [[x.question, x.answer] for x in targets],
    }, sort_keys=True))


class InfluenceEstimator:
    """A LoRA on the base model, warmed up on the documents, and the target's projected gradient."""

    def __init__(self, settings: Settings, documents: list, targets: list[TargetItem], progress: bool = False):
        import torch
        from peft import get_peft_model

        from kinject.core.answer import build_messages
        from kinject.core.engines.base import answer_start, chat_text
        from kinject.core.models import load_causal_lm, lora_config

        if not targets:
            raise InfluenceError("the target objective has no items")
        self.settings, self.cfg = settings, settings.influence
        self.fingerprint = estimator_fingerprint(settings, documents, targets)
        t0, c0 = time.perf_counter(), time.process_time()
        base, self.tokenizer = load_causal_lm(settings.models.llm, settings)
        torch.manual_seed(settings.seed)
        self.model = get_peft_model(base, lora_config(settings))
        self.model.eval()  # no dropout: a sample's gradient is a function of the sample
        self.device = next(self.model.parameters()).device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sketch = CountSketch(sum(p.numel() for p in self.params), self.cfg.dims, settings.seed)
        self.v_hat, self.step = self._warm_up(documents, torch)
        vectors = []
        for item in targets:
            messages = build_messages([{"role": "user", "content": item.question}], None)
            prompt = chat_text(self.tokenizer, messages + [{"role": "assistant", "content": ""}])
            text = chat_text(self.tokenizer, messages + [{"role": "assistant", "content": item.answer}])
            start = answer_start(prompt, text)
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            first = next((i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= start), len(ids))
            # Cut from the front: the answer is what the loss is on, the system prompt is context.
            cut = max(0, len(ids) - self.cfg.max_tokens)
            if first - cut < 1 or first >= len(ids):
                continue  # an answer longer than influence.max_tokens by itself, or an empty one
            vectors.append(_unit(self.sketch(self._gradient(ids[cut:], first - cut))))
        if not vectors:
            raise InfluenceError(f"every target answer is longer than influence.max_tokens={self.cfg.max_tokens}")
        self.target = _unit(torch.stack(vectors).mean(0))
        self.targets_used = len(vectors)
        self.setup_seconds = round(time.perf_counter() - t0, 2)
        self.setup_cpu_seconds = round(time.process_time() - c0, 2)

    def _warm_up(self, documents: list, torch):
        """A few AdamW steps of the fresh LoRA on the documents; returns Adam's bias-corrected
        second moments per parameter, and the step count they were made at."""
        texts = [f"{d.title}\n{d.text}" for d in documents if d.text.strip()]
        if not texts:
            raise InfluenceError("the KB has no document text to warm the estimator up on")
        rng = random.Random(f"{self.settings.seed}:influence-warmup")
        order = [texts[i % len(texts)] for i in range(self.cfg.warmup_steps)]
        rng.shuffle(order)
        opt = torch.optim.AdamW(self.params, lr=self.settings.train.lr, betas=(0.9, _ADAM_BETA2), eps=_ADAM_EPS, weight_decay=0.0)
        for text in order:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.cfg.max_tokens]
            self._backward(ids, 0)
            opt.step()
        steps = self.cfg.warmup_steps
        # a parameter the loss never reached has no state: Adam would not have moved it either
        v_hat = [opt.state[p].get("exp_avg_sq", torch.zeros_like(p)) / (1 - _ADAM_BETA2**steps) for p in self.params]
        self.model.zero_grad(set_to_none=True)
        return v_hat, steps

    def _backward(self, ids: list[int], loss_from: int) -> None:
        import torch

        x = torch.tensor([ids], device=self.device)
        labels = x.clone()
        labels[0, :loss_from] = -100
        self.model.zero_grad(set_to_none=True)
        self.model(input_ids=x, labels=labels).loss.backward()

    def _grads(self, ids: list[int], loss_from: int) -> list:
        """Each LoRA parameter's gradient on `ids` (cut to influence.max_tokens); zeros where the
        loss does not reach."""
        import torch

        self._backward(ids[: self.cfg.max_tokens], loss_from)
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _gradient(self, ids: list[int], loss_from: int = 0):
        import torch

        return torch.cat([g.reshape(-1) for g in self._grads(ids, loss_from)]).cpu()

    def _adam_direction(self, ids: list[int]):
        """The sample's gradient as Adam would step along it after the warm-up."""
        import torch

        t = self.step + 1
        parts = []
        for g, v in zip(self._grads(ids, 0), self.v_hat):
            v_new = (_ADAM_BETA2 * v * (1 - _ADAM_BETA2**self.step) + (1 - _ADAM_BETA2) * g * g) / (1 - _ADAM_BETA2**t)
            parts.append((g / (v_new.sqrt() + _ADAM_EPS)).reshape(-1))
        return torch.cat(parts).cpu()

    def score_text(self, text: str) -> float:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            return 0.0
        return float(_unit(self.sketch(self._adam_direction(ids))) @ self.target)


def _unit(x):
    n = x.norm()
    return x / n if n > 0 else x


# ---- scoring records, cached --------------------------------------------------------------
def record_key(r: dict) -> list:
    return [r["doc_id"], r["type"], r["sample_index"]]


@dataclass
class ScoreRun:
    scores: list[float]  # one per record, in order
    fingerprint: str
    targets: list[TargetItem]
    new: int = 0  # records scored by this run (the rest came from the cache)
    cpu_seconds: float = 0.0  # this run's CPU time (all threads), setup included
    wall_seconds: float = 0.0
    setup_cpu_seconds: float = 0.0  # loading, warm-up and the target gradient
    cached: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "fingerprint": self.fingerprint[:16],
            "targets": len(self.targets),
            "target_source": self.targets[0].source if self.targets else None,
            "scored": self.new,
            "cached": self.cached,
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "setup_cpu_seconds": self.setup_cpu_seconds,
        }


def score_records(
    records: list[dict],
    settings: Settings,
    documents: list,
    cache: Path,
    progress: bool = True,
    estimator: InfluenceEstimator | None = None,
    also_read: list[Path] = (),
) -> tuple[ScoreRun, InfluenceEstimator | None]:
    """Each record's influence (by `train_text`), from the cache file where it holds one for the
    same key, text and estimator, else computed and appended to the cache batch by batch: a run
    killed midway keeps what it scored, and a rerun scores only what is missing. The model is
    loaded only when something is missing; `also_read`: other caches to take scores from (read
    only). Returns the run and the estimator (to reuse)."""
    t0, c0 = time.perf_counter(), time.process_time()
    targets = target_items(settings, documents)
    fp = estimator.fingerprint if estimator is not None else estimator_fingerprint(settings, documents, targets)
    known: dict[tuple, float] = {}
    for row in [r for path in (*also_read, cache) for r in read_jsonl(path)]:
        if row.get("fingerprint") == fp:
            known[(*row["key"], row["text"])] = row["influence"]
    keys = [(*record_key(r), sha256_text(r["train_text"])) for r in records]
    missing_keys = [k for k in dict.fromkeys(keys) if k not in known]
    setup_cpu = 0.0
    if missing_keys:
        if estimator is None:
            estimator = InfluenceEstimator(settings, documents, targets)
            setup_cpu = estimator.setup_cpu_seconds
        text_of = {k: r["train_text"] for k, r in zip(keys, records)}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(missing_keys), unit="sample", desc="influence", dynamic_ncols=True)
        try:
            for start in range(0, len(missing_keys), 8):
                batch = missing_keys[start : start + 8]
                rows = []
                for k in batch:
                    known[k] = round(estimator.score_text(text_of[k]), 6)
                    rows.append({"key": list(k[:3]), "text": k[3], "fingerprint": fp, "influence": known[k]})
                append_jsonl(cache, rows)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
    run = ScoreRun(
        scores=[known[k] for k in keys],
        fingerprint=fp,
        targets=targets,
        new=len(missing_keys),
        cached=len(set(keys)) - len(missing_keys),
        cpu_seconds=round(time.process_time() - c0, 2),
        wall_seconds=round(time.perf_counter() - t0, 2),
        setup_cpu_seconds=setup_cpu,
    )
    return run, estimator


def select_top(records: list[dict], scores: list[float], share: float) -> list[bool]:
    """Which records to keep: the top `share` of each document's samples by score (at least one
    per document). Ranked within a document because a sample's facts are its document's: a
    global cut could drop every sample of a document, and its facts with them. Ties keep the
    earlier record."""
    by_doc: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_doc.setdefault(r["doc_id"], []).append(i)
    keep = [False] * len(records)
    for idx in by_doc.values():
        n = max(1, round(share * len(idx)))
        for i in sorted(idx, key=lambda i: (-scores[i], i))[:n]:
            keep[i] = True
    return keep
