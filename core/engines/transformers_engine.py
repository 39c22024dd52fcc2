"""transformers backend: one base model in memory, LoRA adapters attached with peft (no second
copy of the weights), token streaming.

Two batching policies (`engine.batching`): "continuous" (default) hands every request, streamed or
not, to one scheduler thread that runs them all in a shared batch, rows joining and leaving between
decode steps, mixed adapters included (continuous_batch.py); "per_call" runs `model.generate`
per call, one at a time behind a lock, batching only a call's own requests of the same adapter and
sampling parameters, with the prompts that open alike prefilled once (prefix_sharing.py)."""
from __future__ import annotations

import threading
from itertools import groupby
from pathlib import Path
from typing import Iterator

import torch

from kinject.core.engines.base import (
    Cancelled,
    Engine,
    Generation,
    GenRequest,
    Progress,
    StreamChunk,
    TokenLogprob,
    encode_pair,
    encode_request,
    encode_text,
    render_prompt,
    truncate_at_stop,
)
from kinject.core.engines.continuous_batch import BASE, CancelGroup, ContinuousBatcher, Row
from kinject.core.engines.prefix_sharing import prefix_groups, shared_prefix_inputs
from kinject.core.engines.prompt_cache import PromptCache
from kinject.core.models import load_causal_lm
from kinject.core.settings import Settings


class _Cancelled:
    """StoppingCriteria that ends generation when the client has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, settings: Settings, model_ref: str | None = None):
        self.settings = settings
        self.model_ref = model_ref or settings.models.llm
        self.model, self.tokenizer = load_causal_lm(self.model_ref, settings)
        self.device = self.model.device
        self.max_batch = settings.engine.max_batch_size
        self._lock = threading.RLock()  # the model serves one batch at a time
        self._adapters: dict[str, Path] = {}
        self._stop_matchers: dict[tuple[str, ...], object] = {}
        self._batcher: ContinuousBatcher | None = None
        if settings.engine.batching == "continuous":
            mb = settings.engine.prompt_cache_mb
            prompts = PromptCache(mb * 2**20) if mb else None
            self._batcher = ContinuousBatcher(lambda: self.model, self.tokenizer.eos_token_id, self.max_batch, prompts)

    def _exclusive(self, job):
        """Run `job` with the model to itself: on the scheduler thread between two steps, or
        under the lock when there is no scheduler."""
        if self._batcher is not None:
            return self._batcher.run_exclusive(job)
        with self._lock:
            return job()

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()

    # ---- prompts -------------------------------------------------------------------------
    def render(self, request: GenRequest) -> str:
        return render_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, request: GenRequest) -> int:
        return len(encode_request(self.tokenizer, request))

    # ---- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> None:
        self._exclusive(lambda: self._load_adapter(name, path))

    def _load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self._adapters:
                if self._batcher is not None:
                    self._batcher.forget_prompts(name)
                self.model.delete_adapter(name)
                self.model.load_adapter(str(path), adapter_name=name)
            elif not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                self.model.eval()
            else:
                self.model.load_adapter(str(path), adapter_name=name)
            self._adapters[name] = Path(path)

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def _use(self, adapter: str | None):
        """Context in which the model runs with `adapter` (None = the base weights)."""
        import contextlib

        if not self._adapters:
            if adapter is not None:
                raise KeyError(f"unknown adapter {adapter!r}; none is loaded")
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self._adapters:
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {', '.join(self._adapters)}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _with_model(self, adapter: str | None, compute):
        """compute() run with the model to itself, `adapter` active (scoring)."""

        def job():
            with self._lock, self._use(adapter), torch.inference_mode():
                return compute()

        return self._exclusive(job)

    # ---- generation ----------------------------------------------------------------------
    def _gen_kwargs(self, request: GenRequest) -> dict:
        p = request.params
        kw: dict = {"max_new_tokens": p.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if p.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0)
        if p.stop:
            kw.update(stop_strings=p.stop, tokenizer=self.tokenizer)
        return kw

    @staticmethod
    def _batch_key(r: GenRequest) -> tuple:
        p = r.params
        return (r.adapter or "", p.greedy, p.temperature, p.top_p, p.max_new_tokens, tuple(p.stop))

    def generate(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        if self._batcher is None:
            return self._generate_per_call(requests, progress, cancel)
        if len(requests) > 1 and self.settings.engine.bulk_batching == "static":
            # generate's own batches, between two steps of the shared batch: greedy answers are
            # token for token what per_call gives (eval tables do not move with the traffic).
            return self._batcher.run_exclusive(lambda: self._generate_per_call(requests, progress, cancel))
        return self._generate_continuous(requests, progress, cancel)

    def stream(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        if self._batcher is not None:
            return self._stream_continuous(request, cancel)
        return self._stream_per_call(request, cancel)

    # ---- continuous batching -------------------------------------------------------------
    def _row(self, request: GenRequest, prompt: list[int], group: CancelGroup, sink=None) -> Row:
        p = request.params
        generator = None
        if not p.greedy and p.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(p.seed)
        return Row(prompt, p, self._adapter_name(request.adapter), group, self._stop_criteria(tuple(p.stop)), sink=sink, generator=generator)

    def _adapter_name(self, adapter: str | None) -> str:
        """The row's name for peft's mixed batches; unknown names fail here, in the caller."""
        if adapter is None:
            return BASE
        if adapter not in self._adapters:
            loaded = ", ".join(self._adapters) or "none is loaded"
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {loaded}")
        return adapter

    def _stop_criteria(self, stop: tuple[str, ...]):
        """transformers' stop-string matcher (what `generate(stop_strings=...)` uses), built once
        per set of strings: building one reads the whole vocabulary."""
        from transformers import StopStringCriteria

        stop = tuple(s for s in stop if s)
        if not stop:
            return None
        if stop not in self._stop_matchers:
            if len(self._stop_matchers) >= 64:
                self._stop_matchers.clear()
            self._stop_matchers[stop] = StopStringCriteria(self.tokenizer, list(stop))
        return self._stop_matchers[stop]

    def _generate_continuous(self, requests: list[GenRequest], progress: Progress | None, cancel: threading.Event | None) -> list[Generation]:
        import concurrent.futures

        group = CancelGroup(cancel)
        prompts = [encode_request(self.tokenizer, r) for r in requests]
        rows = [self._row(r, p, group) for r, p in zip(requests, prompts)]
        # Admitted shortest first, so rows of similar lengths run together (less left padding).
        self._batcher.submit(sorted(rows, key=lambda r: len(r.prompt)))
        try:
            for fut in concurrent.futures.as_completed([r.done for r in rows]):
                fut.result()
                if progress:
                    progress(1)
        finally:
            if not all(r.done.done() for r in rows):
                group.cancelled = True  # a failed row or a caller interrupted: the others stop too
        if group.cancelled:
            raise Cancelled()
        return [self._generation(r) for r in rows]

    def _generation(self, row: Row) -> Generation:
        """A finished row as `_generate_batch` reports a row of `generate`'s output."""
        special = (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        ended = any(t in special for t in row.tokens)
        ids = [t for t in row.tokens if t not in special]
        text, stopped = truncate_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), row.params.stop)
        n = len(ids)
        finish = "stop" if (ended or stopped or n < row.params.max_new_tokens) else "length"
        return Generation(text, len(row.prompt), n, finish)

    def _stream_continuous(self, request: GenRequest, cancel: threading.Event | None) -> Iterator[StreamChunk]:
        import queue

        prompt = encode_request(self.tokenizer, request)
        cancel = cancel or threading.Event()
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        row = self._row(request, prompt, CancelGroup(cancel), sink=tokens)
        self._batcher.submit([row])
        text_pieces = _Detokenizer(self.tokenizer)
        cut = _StopCut(request.params.stop)
        try:
            while True:
                item = tokens.get()
                last = item is row.done
                for piece in text_pieces.end() if last else text_pieces.feed(item):
                    delta = cut.feed(piece)
                    if delta:
                        yield StreamChunk(delta)
                if last:
                    break
        finally:
            if not row.done.done():  # the consumer left: stop the row, queued or running
                cancel.set()
                row.group.cancelled = True
                _wait_for(row.done)
        row.done.result()  # raises the generation's error, if any
        eos = self.tokenizer.eos_token_id
        n = len([t for t in row.tokens if t != eos])
        finish = "stop" if (cut.stopped or eos in row.tokens or n < request.params.max_new_tokens) else "length"
        yield StreamChunk("", finish, len(prompt), n)

    # ---- one call at a time (engine.batching = "per_call") --------------------------------
    def _generate_per_call(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        from transformers import StoppingCriteriaList

        results: list[Generation | None] = [None] * len(requests)
        # Similar lengths share a batch, so left padding wastes little (retrieved passages make
        # rag prompts vary by hundreds of tokens).
        prompts = [encode_request(self.tokenizer, r) for r in requests]
        # Rows that begin alike share a batch (their prefix is prefilled once), the groups in
        # order of length like the rows they hold.
        group_of = list(range(len(prompts)))
        if self.settings.engine.prefix_sharing:
            for rows, _ in prefix_groups(prompts):
                for i in rows:
                    group_of[i] = rows[0]
        longest: dict[int, int] = {}
        for i, g in enumerate(group_of):
            longest[g] = max(longest.get(g, 0), len(prompts[i]))
        order = sorted(range(len(requests)), key=lambda i: (self._batch_key(requests[i]), longest[group_of[i]], group_of[i], len(prompts[i])))
        stopping = StoppingCriteriaList([_Cancelled(cancel)]) if cancel is not None else None
        for _, group in groupby(order, key=lambda i: self._batch_key(requests[i])):
            idx = list(group)
            for start in range(0, len(idx), self.max_batch):
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                chunk = idx[start : start + self.max_batch]
                outs = self._generate_batch([requests[i] for i in chunk], [prompts[i] for i in chunk], stopping)
                for i, g in zip(chunk, outs):
                    results[i] = g
                if progress:
                    progress(len(chunk))
        return results  # type: ignore[return-value]

    def _left_padded(self, seqs: list[list[int]]) -> dict:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = [[pad] * (width - len(s)) + s for s in seqs]
        mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
        return {"input_ids": torch.tensor(ids, device=self.device), "attention_mask": torch.tensor(mask, device=self.device)}

    def _generate_batch(self, batch: list[GenRequest], prompts: list[list[int]], stopping=None) -> list[Generation]:
        seed = batch[0].params.seed
        kw = self._gen_kwargs(batch[0])
        if stopping is not None:
            kw["stopping_criteria"] = stopping
        with self._lock, self._use(batch[0].adapter), torch.inference_mode():
            enc = None
            if self.settings.engine.prefix_sharing and len(prompts) > 1:
                enc = shared_prefix_inputs(self.model, prompts, self.tokenizer.pad_token_id, kw["max_new_tokens"])
            enc = enc or self._left_padded(prompts)
            if seed is not None:
                torch.manual_seed(seed)
            # On CUDA generate compiles the model (CUDA graphs) whenever the cache is a StaticCache,
            # as a shared-prefix batch's is. Each batch's cache has a length of its own, so every batch
            # would compile anew, and CUDA graph trees refuse calls from any thread but the first
            # (the server and eval call from worker threads).
            out = self.model.generate(**enc, **kw, disable_compile=True)
        new = out[:, enc["input_ids"].shape[1] :]
        gens = []
        for row, r, mask in zip(new, batch, enc["attention_mask"]):
            ids = row.tolist()
            ended = self.tokenizer.eos_token_id in ids or (self.tokenizer.pad_token_id in ids)
            ids = [t for t in ids if t not in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = truncate_at_stop(text, r.params.stop)
            n = len(ids)
            finish = "stop" if (ended or stopped or n < r.params.max_new_tokens) else "length"
            gens.append(Generation(text, int(mask.sum()), n, finish))
        return gens

    def _stream_per_call(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        enc = self._left_padded([encode_request(self.tokenizer, request)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = cancel or threading.Event()
        kw = self._gen_kwargs(request)
        kw.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        holder: dict = {}

        def run() -> None:
            try:
                with self._lock, self._use(request.adapter), torch.inference_mode():
                    if request.params.seed is not None:
                        torch.manual_seed(request.params.seed)
                    holder["out"] = self.model.generate(**enc, **kw)
            except BaseException as e:  # surfaced to the consumer below
                holder["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        cut = _StopCut(request.params.stop)
        try:
            for piece in streamer:
                delta = cut.feed(piece)
                if delta:
                    yield StreamChunk(delta)
        finally:
            if thread.is_alive():
                cancel.set()
            thread.join()
        if "error" in holder:
            raise holder["error"]
        n_prompt = enc["input_ids"].shape[1]
        new = holder["out"][0, n_prompt:].tolist()
        eos = self.tokenizer.eos_token_id
        n = len([t for t in new if t != eos])
        finish = "stop" if (cut.stopped or eos in new or n < request.params.max_new_tokens) else "length"
        yield StreamChunk("", finish, n_prompt, n)

    # ---- scoring -------------------------------------------------------------------------
    def loglikelihood(self, pairs: list[tuple[str, str]], adapter: str | None = None) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            c, k = encode_pair(self.tokenizer, ctx, cont)
            by_context.setdefault(tuple(c or [bos]), []).append((i, k))
        # A multiple-choice question's choices share one long context (with retrieved passages,
        # hundreds of tokens): it is run once and its cache reused for every choice.
        single: list[tuple[int, list[int], list[int]]] = []
        for c, group in by_context.items():
            if len(group) == 1:
                single.append((group[0][0], list(c), group[0][1]))
                continue
            for (i, _), score in zip(group, self._score_shared_context(list(c), [k for _, k in group], adapter)):
                out[i] = score
        for start in range(0, len(single), self.max_batch):
            chunk = single[start : start + self.max_batch]
            for (i, _, _), score in zip(chunk, self._score_batch([(c, k) for _, c, k in chunk], adapter)):
                out[i] = score
        return out  # type: ignore[return-value]

    def _score_batch(self, chunk: list[tuple[list[int], list[int]]], adapter: str | None) -> list[tuple[float, bool]]:
        seqs = [c + k for c, k in chunk]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
        logits = self._with_model(adapter, lambda: self.model(input_ids=ids, attention_mask=mask).logits.float())
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for row, (c, k) in enumerate(chunk):
            lp = logp[row, len(c) - 1 : len(c) + len(k) - 1]
            out.append(_total_and_greedy(lp, torch.tensor(k, device=self.device)))
        return out

    def _score_shared_context(self, context: list[int], continuations: list[list[int]], adapter: str | None) -> list[tuple[float, bool]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(k) for k in continuations)
        ids = torch.tensor([k + [pad] * (width - len(k)) for k in continuations], device=self.device)
        mask = torch.tensor([[1] * (len(context) + len(k)) + [0] * (width - len(k)) for k in continuations], device=self.device)

        def run():
            first = self.model(input_ids=torch.tensor([context], device=self.device), use_cache=True)
            cache = first.past_key_values
            cache.batch_repeat_interleave(len(continuations))
            return first, self.model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits.float()

        first, logits = self._with_model(adapter, run)
        last = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for row, k in enumerate(continuations):
            # the first token follows the context's last position, the rest the continuation's own
            lp = torch.cat([last[None], logp[row, : len(k) - 1]])
            out.append(_total_and_greedy(lp, torch.tensor(k, device=self.device)))
        return out

    def prompt_logprobs(self, texts: list[str], adapter: str | None = None, top: int = 0) -> list[list[TokenLogprob]]:
        result = []
        for text in texts:
            ids = encode_text(self.tokenizer, text)
            tokens = [self.tokenizer.decode([t]) for t in ids]
            if not ids:
                result.append([])
                continue
            logits = self._with_model(adapter, lambda: self.model(input_ids=torch.tensor([ids], device=self.device)).logits.float())
            logp = torch.log_softmax(logits[0], dim=-1)
            row = [TokenLogprob(tokens[0], None)]
            for i in range(1, len(ids)):
                tops = {}
                if top:
                    vals, idx = logp[i - 1].topk(top)
                    tops = {self.tokenizer.decode([j]): v for j, v in zip(idx.tolist(), vals.tolist())}
                row.append(TokenLogprob(tokens[i], logp[i - 1, ids[i]].item(), tops))
            result.append(row)
        return result


class _StopCut:
    """Streamed text pieces cut at the first stop string: `feed` returns what to send on."""

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.text = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""  # drain; generation ends at the stop string's last token
        candidate, self.stopped = truncate_at_stop(self.text + piece, self.stop)
        delta = candidate[len(self.text) :]
        self.text = candidate
        return delta


class _Detokenizer:
    """Token ids to text pieces, cut where TextIteratorStreamer cuts them (whole words)."""

    def __init__(self, tokenizer):
        from transformers import TextStreamer

        pieces = self.pieces = []

        class Collect(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                pieces.append(text)

        self._streamer = Collect(tokenizer, skip_prompt=False, skip_special_tokens=True)

    def feed(self, token: int) -> list[str]:
        self._streamer.put(torch.tensor([token]))
        return self._take()

    def end(self) -> list[str]:
        self._streamer.end()
        return self._take()

    def _take(self) -> list[str]:
        out, self.pieces[:] = list(self.pieces), []
        return out


def _wait_for(fut) -> None:
    """Wait for a future to end, whatever its outcome."""
    import concurrent.futures

    concurrent.futures.wait([fut])


def _total_and_greedy(logp: torch.Tensor, target: torch.Tensor) -> tuple[float, bool]:
    """Sum of the target tokens' log-probabilities, and whether each was the argmax."""
    total = logp.gather(1, target[:, None]).sum().item()
    return total, bool((logp.argmax(-1) == target).all().item())
