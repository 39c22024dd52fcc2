"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it.

The context is the mode's prompt for the question, built by the Answerer exactly as the service
would build it (system prompt, retrieved passages in rag modes, chat template) and ending where
the answer goes; each choice is scored as its continuation. `acc` takes the choice with the
highest summed log-probability, `acc_norm` the highest log-probability per character of the
choice, which removes the bias towards short choices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kinject.core.answer import Answerer, source_dict
from kinject.core.engines import SamplingParams
from kinject.eval.questions import Question


@dataclass
class ChoiceScores:
    logprobs: list[float]
    pred: int  # argmax of the summed log-probability
    pred_norm: int  # argmax of the log-probability per character


@dataclass
class MCResult:
    question: Question
    mode: str  # the mode that answered (auto resolved)
    scores: ChoiceScores
    sources: list[dict] = field(default_factory=list)
    route_reason: str = ""
    latency_s: float = 0.0

    @property
    def acc(self) -> float:
        return float(self.scores.pred == self.question.answer_index)

    @property
    def acc_norm(self) -> float:
        return float(self.scores.pred_norm == self.question.answer_index)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of equals, as numpy does


def continuation(context: str, choice: str) -> str:
    # A chat template ends the context with a newline; a plain transcript ends with "Assistant:".
    return choice if context[-1:].isspace() else " " + choice


def pick(logprobs: list[float], choices: Sequence[str]) -> ChoiceScores:
    chars = [max(1, len(c)) for c in choices]
    norm = [lp / n for lp, n in zip(logprobs, chars)]
    return ChoiceScores(list(logprobs), _argmax(logprobs), _argmax(norm))


def score_choices(engine, context: str, choices: Sequence[str], adapter: str | None = None) -> ChoiceScores:
    """Score one question's choices after `context` on `engine`."""
    lls = engine.loglikelihood([(context, continuation(context, c)) for c in choices], adapter=adapter)
    return pick([ll for ll, _ in lls], choices)


def score_mc(
    answerer: Answerer,
    mode: str,
    questions: list[Question],
    chunk: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[MCResult]:
    """Score multiple-choice questions in one mode. RAG modes retrieve with the question alone,
    as a user's request would. Questions go to the engine `chunk` at a time; each question's
    latency is the time of its chunk (retrieval and scoring)."""
    params = SamplingParams(max_new_tokens=1)  # unused for scoring; prepare() needs one
    results: list[MCResult] = []
    for start in range(0, len(questions), chunk):
        batch = questions[start : start + chunk]
        t0 = time.perf_counter()
        prepared = [answerer.prepare(mode, [{"role": "user", "content": q.question}], params) for q in batch]
        engine = answerer.engine  # after prepare loaded the adapter: a fully fine-tuned one wraps the engine
        pairs_by_adapter: dict[str | None, list[tuple[int, str, str]]] = {}
        for i, (q, p) in enumerate(zip(batch, prepared)):
            context = engine.render(p.request)
            for c in q.choices or ():
                pairs_by_adapter.setdefault(p.request.adapter, []).append((i, context, continuation(context, c)))
        logprobs: list[list[float]] = [[] for _ in batch]
        for adapter, rows in pairs_by_adapter.items():
            lls = engine.loglikelihood([(ctx, cont) for _, ctx, cont in rows], adapter=adapter)
            for (i, _, _), (ll, _) in zip(rows, lls):
                logprobs[i].append(ll)
        latency = time.perf_counter() - t0
        for q, p, lps in zip(batch, prepared, logprobs):
            results.append(MCResult(q, p.mode, pick(lps, q.choices or ()), [source_dict(h) for h in p.hits], p.route_reason, latency))
        if progress:
            progress(len(batch))
    return results
