"""From planned samples to engine requests, and from generations to stored sample records.

The engine is reached only through the `Engine` interface (generate with per-request
SamplingParams and seed, count_tokens), so the transformers, vLLM and OpenAI-compatible engines
all serve. The engine starts lazily: a rerun with nothing left to generate never loads a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kinject.core.engines import Engine, Generation, GenRequest, SamplingParams, make_engine
from kinject.core.errors import KinjectError
from kinject.core.settings import Settings
from kinject.augment.curate import trim_to_sentence
from kinject.augment.plan import PlannedSample
from kinject.augment.prompts import COMPLETION_STOP, PROMPT_TYPES, PromptType

_PROMPT_MARGIN = 8  # tokens kept free beside prompt + completion for special tokens
RULE_GENERATOR = "rule"  # the `generator` of samples cut by rule


class AugmentError(KinjectError):
    pass


def generator_model(settings: Settings) -> str:
    """The model that writes the samples, as recorded in each sample's `generator` field."""
    if settings.models.augment_llm:
        return settings.models.augment_llm
    if settings.engine.backend == "openai" and settings.engine.openai_model:
        return settings.engine.openai_model
    return settings.models.llm


def _engine_has_chat_template(engine: Engine) -> bool:
    tokenizer = getattr(engine, "tokenizer", None)
    return True if tokenizer is None else bool(getattr(tokenizer, "chat_template", None))


@dataclass
class Generator:
    """The engine (started on first use), its token counter and the prompt style it wants."""

    settings: Settings
    model: str
    style: str  # "chat" or "completion"
    count_tokens: Callable[[str], int]
    _engine: Engine | None = None
    _owned: bool = False
    _fitted: dict = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings, engine: Engine | None = None) -> "Generator":
        model = generator_model(settings)
        style = settings.augment.prompt_style
        if engine is None and settings.engine.backend == "openai":
            engine = _start_engine(settings)  # cheap (an HTTP client) and the only token counter
            owned = True
        else:
            owned = False
        if engine is not None:
            chat = _engine_has_chat_template(engine)
            count = engine.count_tokens
        else:
            # Counting tokens and picking the prompt style need the tokenizer only, not the model.
            from kinject.core.models import load_tokenizer, resolve_model

            tokenizer = load_tokenizer(resolve_model(model, settings))
            chat = bool(tokenizer.chat_template)
            count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        if style == "auto":
            style = "chat" if chat else "completion"
        return cls(settings, model, style, count, engine, owned)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine, self._owned = _start_engine(self.settings), True
        return self._engine

    @property
    def engine_name(self) -> str:
        return self._engine.name if self._engine is not None else self.settings.engine.backend

    def endpoints(self) -> dict[str, str]:
        """endpoint URL -> "live" or "dead" when the engine is one over OpenAI-compatible
        endpoints and has started; empty otherwise."""
        return dict(getattr(self._engine, "endpoints", None) or {})

    def close(self) -> None:
        if self._owned and self._engine is not None:
            self._engine.close()
        self._engine = None

    def prompt_id(self, type_id: str) -> str:
        return PROMPT_TYPES[type_id].prompt_id(self.style)

    # ---- requests ------------------------------------------------------------------------
    def request(self, doc, planned: PlannedSample) -> GenRequest:
        cfg = self.settings.augment
        ptype = PROMPT_TYPES[planned.type]
        text = self._fit(doc, ptype)
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=planned.seed,
            stop=list(COMPLETION_STOP) if self.style == "completion" else [],
        )
        if self.style == "chat":
            return GenRequest(messages=ptype.chat(doc.title, text), params=params)
        return GenRequest(prompt=ptype.completion(doc.title, text), params=params)

    def _render(self, ptype: PromptType, title: str, text: str) -> str:
        if self.style == "chat":
            return "\n".join(m["content"] for m in ptype.chat(title, text))
        return ptype.completion(title, text)

    def _fit(self, doc, ptype: PromptType) -> str:
        """The document text, cut at a word boundary if the prompt would not fit the context."""
        key = (doc.doc_id, ptype.id)
        if key not in self._fitted:
            limit = self.settings.engine.max_model_len - self.settings.augment.max_new_tokens - _PROMPT_MARGIN
            text = doc.text
            overhead = self.count_tokens(self._render(ptype, doc.title, ""))
            if limit - overhead < 32:
                raise AugmentError(
                    f"engine.max_model_len={self.settings.engine.max_model_len} leaves no room for the document "
                    f"after augment.max_new_tokens={self.settings.augment.max_new_tokens}: raise the one or lower the other"
                )
            while (n := self.count_tokens(self._render(ptype, doc.title, text))) > limit:
                keep = int(len(text) * (limit - overhead) / (n - overhead) * 0.95)
                text = text[:keep].rsplit(" ", 1)[0]
            self._fitted[key] = text
        return self._fitted[key]

    # ---- records -------------------------------------------------------------------------
    def rule_record(self, doc, planned: PlannedSample, share: float = 1.0) -> dict:
        """A sample of a rule type: cut from the document, no engine involved."""
        from kinject.augment.extract import rule_sample

        text = rule_sample(planned.type, doc.title, doc.text, planned.sample_index, planned.seed, share)
        return {
            "doc_id": planned.doc_id,
            "type": planned.type,
            "sample_index": planned.sample_index,
            "seed": planned.seed,
            "prompt_id": self.prompt_id(planned.type),
            "generator": RULE_GENERATOR,
            "engine": RULE_GENERATOR,
            "content_hash": doc.content_hash,
            "doc_cut": False,
            "text": text,
            "tokens": self.count_tokens(text) if text else 0,
            "finish_reason": "stop",
            "prompt_tokens": 0,
        }

    def record(self, doc, planned: PlannedSample, gen: Generation) -> dict:
        cfg = self.settings.augment
        ptype = PROMPT_TYPES[planned.type]
        text = (ptype.lead + gen.text) if self.style == "completion" else gen.text
        rec = {
            "doc_id": planned.doc_id,
            "type": planned.type,
            "sample_index": planned.sample_index,
            "seed": planned.seed,
            "prompt_id": self.prompt_id(planned.type),
            "generator": self.model,
            "engine": self.engine_name,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "content_hash": doc.content_hash,
            "doc_cut": self._fitted[(doc.doc_id, planned.type)] != doc.text,
            "text": text,
            "tokens": gen.completion_tokens,
            "finish_reason": gen.finish_reason,
            "prompt_tokens": gen.prompt_tokens,
        }
        if gen.finish_reason == "length":
            # Cut off mid-sentence: keep what is whole, counted now while a tokenizer is at hand.
            trimmed = trim_to_sentence(text)
            rec["trimmed_text"] = trimmed
            rec["trimmed_tokens"] = self.count_tokens(trimmed) if trimmed else 0
        if gen.endpoint is not None:
            rec["endpoint"] = gen.endpoint  # which server wrote it, for the report; resume ignores it
        return rec


def _start_engine(settings: Settings) -> Engine:
    model_ref = settings.models.augment_llm or None
    try:
        return make_engine(settings, model_ref, lora=False)  # the generator writes with its base weights
    except KinjectError:
        raise
    except (ImportError, ValueError, OSError) as e:
        raise AugmentError(f"cannot start the {settings.engine.backend!r} engine: {e}") from e
