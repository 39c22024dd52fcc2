"""OpenAI sampling options -> the engine's SamplingParams, one rule for chat and completions.

- `temperature` defaults to 0 (greedy): a knowledge service should give the same answer twice.
- `max_tokens` < 1 is a 400 (except 0 with `echo` on /v1/completions, for log-likelihood
  scoring). Above `serve.max_new_tokens` it is clamped to that limit, as it is to the room left
  in the engine's context (`engine.max_model_len` minus the prompt); a clamped answer that runs
  out of room ends with finish_reason "length", which tells the client.
- `n` answers use seeds seed, seed+1, ...; answer i is the same streamed or not and whatever n is
  (see core.answer.Answerer.generate).
"""
from __future__ import annotations

from core.engines import SamplingParams
from core.settings import Settings
from service.errors import bad_request

DEFAULT_TEMPERATURE = 0.0


def max_new_tokens(requested: int | None, settings: Settings, *, allow_zero: bool = False, param: str = "max_tokens") -> int:
    limit = settings.serve.max_new_tokens
    if requested is None:
        return limit
    if requested < (0 if allow_zero else 1):
        floor = "0 (with echo)" if allow_zero else "1"
        raise bad_request(f"{param} must be at least {floor}, got {requested}", param=param, code="invalid_value")
    return min(requested, limit)


def fit_context(params: SamplingParams, prompt_tokens: int, settings: Settings) -> None:
    """Leave the engine room for the prompt: prompt + new tokens <= engine.max_model_len."""
    room = settings.engine.max_model_len - prompt_tokens
    params.max_new_tokens = max(1, min(params.max_new_tokens, room))


def refuse_unsupported(req) -> None:
    """Options that would change the answer and that the engines do not implement."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported by kinject; leave it at 0", param=name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by kinject", param="logit_bias")


def sampling_params(req, max_tokens: int, seed_default: int | None = None) -> SamplingParams:
    refuse_unsupported(req)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed if req.seed is not None else seed_default,
        stop=list(req.stop or []),
    )
