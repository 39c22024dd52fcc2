"""Fully fine-tuned models served beside the base model, as adapters are.

`train.full_finetune` writes a whole model (the KB's adapter/model/), not a LoRA, so the adapter
modes (ft, ft-rag) need a second set of weights in memory. `WithFullModels` wraps the engine that
holds the base model: a request naming such a model goes to a second engine of the same backend,
loaded from that model's folder, and every other request to the base engine, unchanged. Only the
transformers backend holds a second model this way; vLLM reserves most of the GPU for one model's
KV cache, and an OpenAI-compatible server is given its models by whoever runs it.
"""
from __future__ import annotations

import dataclasses
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from kinject.core.adapter_copy import FULL_MODEL_DIR
from kinject.core.engines.base import Engine, Generation, GenRequest, Progress, StreamChunk, TokenLogprob
from kinject.core.errors import KinjectError
from kinject.core.settings import Settings


def full_model_dir(folder: Path) -> Path | None:
    """The whole model `kinject train` wrote with train.full_finetune into `folder`, or None."""
    model = Path(folder) / FULL_MODEL_DIR
    return model if (model / "config.json").exists() and not (Path(folder) / "adapter_config.json").exists() else None


class WithFullModels(Engine):
    """The base engine, plus one engine per fully fine-tuned model, chosen by a request's adapter."""

    def __init__(self, base: Engine, settings: Settings):
        if base.name != "transformers":
            raise KinjectError(
                f"a fully fine-tuned model (train.full_finetune) is served by the transformers engine, not by {base.name}: "
                "set engine.backend=transformers, or serve the KB's adapter/model folder with an engine of its own"
            )
        self.base, self.settings, self.name = base, settings, base.name
        self._full: dict[str, Engine] = {}
        self._calls: dict[int, int] = {}  # id(engine) -> calls running on it
        self._retired: dict[int, Engine] = {}  # replaced engines waiting for their calls to end
        self._guard = threading.Lock()

    def __getattr__(self, attr: str):
        # What is not about choosing weights (the tokenizer, a lazy start, ...) is the base engine's.
        if attr in ("base", "_full", "_calls", "_retired"):
            raise AttributeError(attr)
        return getattr(self.base, attr)

    # ---- weights ---------------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> None:
        model = full_model_dir(path)
        if model is None:
            self.base.add_adapter(name, path)
            return
        from kinject.core.engines import make_engine

        engine = make_engine(self.settings, str(model), lora=False)
        with self._guard:
            old, self._full[name] = self._full.get(name), engine
        if old is not None:
            self._retire(old)

    def remove_adapter(self, name: str) -> bool:
        """Stop answering for the whole model `name` (a retrain replaced it); False when `name`
        is not one (a LoRA stays in the base engine). Its engine closes, and its weights leave
        memory, once the calls already running on it have ended; its folder is no longer read."""
        with self._guard:
            old = self._full.pop(name, None)
        if old is not None:
            self._retire(old)
        return old is not None

    def _retire(self, engine: Engine) -> None:
        with self._guard:
            if self._calls.get(id(engine)):
                self._retired[id(engine)] = engine
                return
        engine.close()

    @property
    def adapters(self) -> list[str]:
        return [*self.base.adapters, *self._full]

    @contextmanager
    def _target(self, adapter: str | None) -> Iterator[tuple[Engine, str | None]]:
        """The engine that answers for `adapter`, and the adapter to name there (a fully
        fine-tuned model's engine runs its own weights, so it is asked for none), held open
        for the duration of the call."""
        with self._guard:
            full = self._full.get(adapter) if adapter is not None else None
            if full is not None:
                self._calls[id(full)] = self._calls.get(id(full), 0) + 1
        try:
            yield (full, None) if full is not None else (self.base, adapter)
        finally:
            if full is not None:
                with self._guard:
                    left = self._calls.pop(id(full)) - 1
                    if left:
                        self._calls[id(full)] = left
                    done = None if left else self._retired.pop(id(full), None)
                if done is not None:
                    done.close()

    # ---- generation and scoring --------------------------------------------------------------
    def generate(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(requests)
        with ExitStack() as held:
            targets = {a: held.enter_context(self._target(a)) for a in dict.fromkeys(r.adapter for r in requests)}
            # One call per engine: the base model's requests, LoRAs included, share its batches.
            groups: dict[int, tuple[Engine, list[int], list[GenRequest]]] = {}
            for i, r in enumerate(requests):
                engine, name = targets[r.adapter]
                _, where, batch = groups.setdefault(id(engine), (engine, [], []))
                where.append(i)
                batch.append(dataclasses.replace(r, adapter=name))
            for engine, where, batch in groups.values():
                for i, g in zip(where, engine.generate(batch, progress=progress, cancel=cancel)):
                    out[i] = g
        return out  # type: ignore[return-value]

    def stream(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        with self._target(request.adapter) as (engine, adapter):
            yield from engine.stream(dataclasses.replace(request, adapter=adapter), cancel)

    def loglikelihood(self, pairs: list[tuple[str, str]], adapter: str | None = None) -> list[tuple[float, bool]]:
        with self._target(adapter) as (engine, name):
            return engine.loglikelihood(pairs, adapter=name)

    def prompt_logprobs(self, texts: list[str], adapter: str | None = None, top: int = 0) -> list[list[TokenLogprob]]:
        with self._target(adapter) as (engine, name):
            return engine.prompt_logprobs(texts, adapter=name, top=top)

    # ---- prompts: one tokenizer and chat template, which training keeps ------------------------
    def count_tokens(self, text: str) -> int:
        return self.base.count_tokens(text)

    def render(self, request: GenRequest) -> str:
        return self.base.render(request)

    def prompt_tokens(self, request: GenRequest) -> int:
        return self.base.prompt_tokens(request)

    def close_full_models(self) -> None:
        """Close the whole models' engines and leave the base engine open (it may be shared)."""
        with self._guard:
            engines, self._full = [*self._full.values(), *self._retired.values()], {}
            self._retired = {}
        for engine in engines:
            engine.close()

    def close(self) -> None:
        self.close_full_models()
        self.base.close()
