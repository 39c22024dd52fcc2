"""Continuous batching for the transformers engine.

One scheduler thread owns the model. Requests queue up; between two decode steps the scheduler
admits waiting ones (each prompt is prefilled on its own, then its KV cache joins the running
batch, left-padded to a common width) and drops the rows that finished, so a request never waits
for another to end, and requests for different LoRA adapters or for the base weights share each
forward pass (peft's per-row `adapter_names`).

Each row keeps the semantics of a lone `model.generate` call: greedy is argmax of the float32
logits; sampling applies the temperature and top-p warpers and draws from the row's own
`torch.Generator` when it has a seed (so a seeded answer is the same alone or batched); a row ends
on EOS, on its max_new_tokens, on a stop string (transformers' StopStringCriteria, on the row's
own tokens), or when its cancel event is set; that event is looked at once per token made, as a
stopping criterion is in `generate`.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kinject.core.engines.base import SamplingParams

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class CancelGroup:
    """The cancel event shared by the rows of one call: looked at once per decode step whatever
    the number of its rows running (a `generate` call with one event, as `generate` looks once per
    step for its whole batch), and remembered once seen set, so its queued rows are dropped unrun."""

    def __init__(self, event: threading.Event | None):
        self.event = event
        self.cancelled = False

    def look(self) -> bool:
        if not self.cancelled and self.event is not None and self.event.is_set():
            self.cancelled = True
        return self.cancelled


@dataclass
class Row:
    """One request in the batch: its prompt, what it has made, and where its tokens go."""

    prompt: list[int]
    params: SamplingParams
    adapter: str  # a loaded adapter's name, or BASE
    group: CancelGroup
    stop_criteria: Any = None  # transformers' StopStringCriteria for params.stop, or None
    tokens: list[int] = field(default_factory=list)
    sink: "queue.SimpleQueue | None" = None  # streamed: each token id, then the finished row
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    generator: torch.Generator | None = None
    stopped_by_string: bool = False

    @property
    def position(self) -> int:
        """Position id of the last token made (the next input)."""
        return len(self.prompt) + len(self.tokens) - 1


class ContinuousBatcher:
    """The scheduler. `model()` returns the current model (add_adapter may wrap it in peft);
    `eos`: the token that ends a row."""

    def __init__(self, model: Callable[[], Any], eos: int, max_batch: int, name: str = "kinject-batcher"):
        self._model = model
        self._eos = eos
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._waiting: list[Row] = []
        self._jobs: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._closed = False
        # The running batch: rows, their KV cache, and its attention mask (0 = left padding).
        self._rows: list[Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- callers' side ---------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.extend(rows)
            self._cond.notify()

    def run_exclusive(self, job: Callable[[], Any]) -> Any:
        """Run `job` on the scheduler thread between two steps (scoring, loading an adapter):
        nothing else touches the model meanwhile, and no lock can starve it."""
        if threading.current_thread() is self._thread:
            return job()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._jobs.append((job, fut))
            self._cond.notify()
        return fut.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(60)

    # ---- scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._jobs or self._waiting or self._rows):
                    self._cond.wait()
                if self._closed:
                    break
                jobs, self._jobs = self._jobs, []
                room = self._max_batch - len(self._rows)
                admitted, self._waiting = self._waiting[:room], self._waiting[room:]
            for job, fut in jobs:
                _run_into(fut, job)
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except BaseException as e:  # the batch's rows get the error; the scheduler lives on
                for row in self._rows + [r for r in admitted if not r.done.done()]:
                    _finish(row, error=e)
                self._rows, self._cache, self._mask = [], None, None
        self._fail_all(RuntimeError("the engine is closed"))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            waiting, self._waiting = self._waiting, []
            jobs, self._jobs = self._jobs, []
        for row in self._rows + waiting:
            _finish(row, error=error)
        for _, fut in jobs:
            fut.set_exception(error)

    def _step(self, admitted: list[Row]) -> None:
        """One decode step for the running rows, then the admitted rows' prefills (each makes
        its first token), then every row that made a token is checked for its end."""
        made = list(self._rows)
        if self._rows:
            self._append(self._rows, self._decode())
        for row in admitted:
            if row.group.cancelled:  # its call was cancelled while it waited: never run
                _finish(row)
                continue
            self._admit(row)
            made.append(row)
        self._retire(made)

    def _forward(self, rows: list[Row], **inputs):
        model = self._model()
        if hasattr(model, "peft_config"):
            inputs["adapter_names"] = [r.adapter for r in rows]
        return model(**inputs, use_cache=True)

    def _decode(self) -> torch.Tensor:
        rows = self._rows
        device = self._mask.device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        positions = torch.tensor([[r.position] for r in rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        out = self._forward(rows, input_ids=ids, attention_mask=self._mask, position_ids=positions, past_key_values=self._cache)
        return out.logits[:, -1].float()

    def _admit(self, row: Row) -> None:
        """Prefill the row alone (no padding: its first token is what it would be alone) and
        join its cache to the batch."""
        from transformers import DynamicCache

        model = self._model()
        device = model.device
        ids = torch.tensor([row.prompt], device=device)
        cache = DynamicCache(config=model.config)
        mask = torch.ones_like(ids)
        positions = torch.arange(len(row.prompt), device=device)[None]
        out = self._forward([row], input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
        self._join(row, out.past_key_values, mask)
        self._append([row], out.logits[:, -1].float())

    def _join(self, row: Row, cache, mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = [row], cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._rows.append(row)

    def _append(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from its logits (one row per line)."""
        tokens = logits.argmax(dim=-1).tolist()
        sampled: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(rows):
            if not row.params.greedy:
                sampled.setdefault((row.params.temperature, row.params.top_p), []).append(i)
        # The warpers work row by row, so rows with the same settings share one call (a top-p
        # sort over the vocabulary per row and step would cost as much as the forward pass).
        for (temperature, top_p), index in sampled.items():
            probs = _probabilities(logits[index], temperature, top_p)
            for line, i in enumerate(index):
                tokens[i] = int(torch.multinomial(probs[line : line + 1], num_samples=1, generator=rows[i].generator))
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
            if row.sink is not None:
                row.sink.put(token)

    def _retire(self, rows: list[Row]) -> None:
        """End the rows that are done (EOS, length, stop string, cancel) and drop them from the
        batch. Every row is checked for every cause, as a StoppingCriteriaList checks each."""
        ended = []
        looked: set[int] = set()
        for row in rows:
            end = row.tokens[-1] == self._eos or len(row.tokens) >= row.params.max_new_tokens
            if row.stop_criteria is not None and self._stop_string_ends(row):
                row.stopped_by_string = end = True
            if id(row.group) not in looked:
                looked.add(id(row.group))
                row.group.look()
            if end or row.group.cancelled:
                ended.append(row)
        if not ended:
            return
        for row in ended:
            _finish(row)
        gone = {id(r) for r in ended}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        if len(keep) < len(self._rows):
            self._select(keep)

    def _stop_string_ends(self, row: Row) -> bool:
        tail = (row.prompt + row.tokens)[-row.stop_criteria.maximum_token_len :]
        return bool(row.stop_criteria(torch.tensor([tail]), None)[0])

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows, and cut the padding columns no kept row needs any more."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        start = int(mask.any(dim=0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._mask = mask[:, start:]


def _probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What `generate(do_sample=True, temperature, top_p, top_k=0)` draws from: its warpers, in
    its order, then a softmax."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = logits
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.nn.functional.softmax(scores, dim=-1)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _finish(row: Row, error: BaseException | None = None) -> None:
    if row.done.done():
        return
    if error is not None:
        row.done.set_exception(error)
    else:
        row.done.set_result(row)
    if row.sink is not None:
        row.sink.put(row.done)  # the end marker: the consumer reads the result or error from it


def _run_into(fut: concurrent.futures.Future, job: Callable[[], Any]) -> None:
    try:
        fut.set_result(job())
    except BaseException as e:
        fut.set_exception(e)
