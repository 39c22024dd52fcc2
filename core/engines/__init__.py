"""Engine factory: the one place that maps `engine.backend` to an implementation."""
from __future__ import annotations

from core.engines.base import Engine, Generation, GenRequest, SamplingParams, StreamChunk, TokenLogprob
from core.settings import Settings

__all__ = ["Engine", "Generation", "GenRequest", "SamplingParams", "StreamChunk", "TokenLogprob", "make_engine"]


def make_engine(settings: Settings, model_ref: str | None = None) -> Engine:
    backend = settings.engine.backend
    if backend == "transformers":
        from core.engines.transformers_engine import TransformersEngine

        return TransformersEngine(settings, model_ref)
    if backend == "vllm":
        from core.engines.vllm_engine import VLLMEngine

        return VLLMEngine(settings, model_ref)
    if backend == "openai":
        from core.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(settings, model_ref)
    raise ValueError(f"engine backend {backend!r} is not available in this build")
