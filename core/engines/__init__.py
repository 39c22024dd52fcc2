"""Engine factory: the one place that maps `engine.backend` to an implementation."""
from __future__ import annotations

from kinject.core.engines.base import Engine, Generation, GenRequest, SamplingParams, StreamChunk, TokenLogprob
from kinject.core.settings import Settings

__all__ = ["Engine", "Generation", "GenRequest", "SamplingParams", "StreamChunk", "TokenLogprob", "make_engine"]


def make_engine(settings: Settings, model_ref: str | None = None, lora: bool = True) -> Engine:
    """lora=False promises that no request names an adapter: vLLM then builds no LoRA layers. The
    other engines apply an adapter only to the requests that name one, so it costs them nothing."""
    backend = settings.engine.backend
    if backend == "transformers":
        from kinject.core.engines.transformers_engine import TransformersEngine

        return TransformersEngine(settings, model_ref)
    if backend == "vllm":
        from kinject.core.engines.vllm_engine import VLLMEngine

        return VLLMEngine(settings, model_ref, lora=lora)
    if backend == "openai" and settings.engine.openai_base_urls:
        from kinject.core.engines.openai_fleet import OpenAIFleetEngine

        return OpenAIFleetEngine(settings, model_ref)
    if backend == "openai":
        from kinject.core.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(settings, model_ref)
    raise ValueError(f"engine backend {backend!r} is not available in this build")
