"""OpenAI sampling options -> the engine's SamplingParams, one rule for chat and completions.

- `temperature` defaults to 0 (greedy): a knowledge service should give the same answer twice.
- `max_tokens` < 1 is a 400 (except 0 with `echo` on /v1/completions, for log-likelihood
  scoring); left out, it is `serve.max_new_tokens`. The answering policy (core.policy) then clamps
  it to `serve.max_new_tokens` and to the room the prompt leaves in `engine.max_model_len`; a
  clamped answer that runs out of room ends with finish_reason "length", which tells the client.
- `n` answers use seeds seed, seed+1, ...; answer i is the same streamed or not and whatever n is
  (see core.answer.Answerer.generate). One request asks for at most `serve.max_choices` answers
  (n, times the prompts on /v1/completions): they all run in the one slot it holds.
- `stop`: at most `serve.max_stop_sequences` strings of at most `serve.max_stop_chars`
  characters. The transformers engine prepares a matcher per stop string over the whole
  vocabulary, under the engine lock; its cost grows with the string (3,000 characters took 29 s
  and 2 GB).
"""
from __future__ import annotations

from kinject.core.engines import SamplingParams
from kinject.core.settings import Settings
from kinject.service.errors import bad_request

DEFAULT_TEMPERATURE = 0.0


def max_new_tokens(requested: int | None, settings: Settings, *, allow_zero: bool = False, param: str = "max_tokens") -> int:
    """The new tokens a request asks for, before the policy clamps them."""
    if requested is None:
        return settings.serve.max_new_tokens
    if requested < (0 if allow_zero else 1):
        floor = "0 (with echo)" if allow_zero else "1"
        raise bad_request(f"{param} must be at least {floor}, got {requested}", param=param, code="invalid_value")
    return requested


def check_choices(count: int, settings: Settings) -> None:
    limit = settings.serve.max_choices
    if count > limit:
        raise bad_request(f"this request asks for {count} answers, more than {limit} (serve.max_choices; prompts x n on /v1/completions)", param="n", code="too_many_choices")


def check_stop(stop: list[str], settings: Settings) -> None:
    serve = settings.serve
    if len(stop) > serve.max_stop_sequences:
        raise bad_request(f"at most {serve.max_stop_sequences} stop sequences are allowed (serve.max_stop_sequences), got {len(stop)}", param="stop", code="invalid_value")
    longest = max((len(s) for s in stop), default=0)
    if longest > serve.max_stop_chars:
        raise bad_request(f"stop sequences may be at most {serve.max_stop_chars} characters long (serve.max_stop_chars), got {longest}", param="stop", code="invalid_value")


def refuse_unsupported(req) -> None:
    """Options that would change the answer and that the engines do not implement."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported by kinject; leave it at 0", param=name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by kinject", param="logit_bias")


def sampling_params(req, max_tokens: int, settings: Settings) -> SamplingParams:
    refuse_unsupported(req)
    check_stop(list(req.stop or []), settings)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=list(req.stop or []),
    )
