"""POST /v1/completions: raw text continuation, with `echo` and token `logprobs`.

Retrieval is NOT applied here: a raw prompt has no question to retrieve for and no place for
quoted passages, and log-likelihood tools need the exact text they sent scored. The `model`
field selects the adapter only: kinject-base and kinject-rag run the base weights, kinject-ft and
kinject-ft-rag the KB's adapter, kinject-auto the adapter when the KB has one. `kinject_mode`
says which ("base" or "ft").

Logprobs: the prompt (with `echo`) and the generated text are scored in one forward pass by
engine.prompt_logprobs, so each generated token's logprob is the model's (temperature 1)
log-probability of that token given everything before it, as OpenAI reports them. The first
prompt token has no context and gets null. `max_tokens: 0` with `echo` scores the prompt only.
Prompts are text; token-id prompts are refused (lm-eval: tokenized_requests=False). Text that
reads like a special token (`<|im_start|>`) is tokenized as the characters it is.

One request holds one slot for all its prompts x n answers (at most serve.max_choices).
"""
from __future__ import annotations

import threading
from contextlib import aclosing
from typing import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from kinject.core.answer import AUTO, MODES, with_seed
from kinject.core.engines import Engine, Generation, GenRequest, SamplingParams, TokenLogprob
from kinject.core.policy import PromptTooLong, Slot, check_prompt, fit_answer
from kinject.service.errors import APIError, bad_request
from kinject.service.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    new_id,
    now,
)
from kinject.service.sampling import check_choices, max_new_tokens, sampling_params
from kinject.service.state import ServiceState, get_state
from kinject.service.streaming import SSEResponse, closing_events, in_thread, sse, stream_error, unless_gone

router = APIRouter()


def prompts_of(req: CompletionRequest) -> list[str]:
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise bad_request("prompt must not be empty", param="prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise bad_request("token-id prompts are not supported: send the prompt as text", param="prompt")
    if any(p == "" for p in prompts):
        raise bad_request("prompt must not be an empty string", param="prompt")
    return prompts


def check_options(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (use n)", param="best_of")
    if req.stream and req.logprobs is not None:
        raise bad_request("logprobs are not available with stream; send stream: false", param="logprobs")


def raw_mode(state: ServiceState, mode: str) -> str:
    """The mode without retrieval: "ft" when the named mode uses the adapter, else "base"."""
    if mode == AUTO:
        mode, _ = state.answerer.route([])
    return "ft" if MODES[mode].adapter else "base"


def logprobs_of(prompt: str, text: str, scored: list[TokenLogprob], echo: bool) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset, cut = 0, len(prompt)
    for t in scored:
        start = offset
        offset += len(t.token)
        if not echo and start < cut:
            continue
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(dict(t.top) if t.logprob is not None else None)
        out.text_offset.append(start if echo else start - cut)
    return out


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, state: ServiceState = Depends(get_state)):
    check_options(req)
    prompts = prompts_of(req)
    check_choices(len(prompts) * req.n, state.settings)
    params = sampling_params(req, max_new_tokens(req.max_tokens, state.settings, allow_zero=req.echo), state.settings)
    async with state.slots.slot() as slot:  # reading the manifest, loading an adapter, tokenizing: model work too

        def resolve() -> tuple[str, str | None, Engine, list[int]]:
            mode = raw_mode(state, state.mode_for(req.model))
            adapter = state.answerer.adapter_name if mode == "ft" else None
            engine = state.answerer.engine  # after the adapter is loaded: a fully fine-tuned one wraps the engine
            return mode, adapter, engine, [engine.prompt_tokens(GenRequest(prompt=p, adapter=adapter)) for p in prompts]

        mode, adapter, engine, counts = await anyio.to_thread.run_sync(resolve)
        try:
            for n_tokens in counts:
                check_prompt(n_tokens, state.settings)
        except PromptTooLong as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        params = fit_answer(params, max(counts), state.settings)
        headers = {"x-kinject-mode": mode}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            held = slot.pass_on()
            body = stream_completion(state, req, prompts, params, adapter, mode, include_usage, sum(counts), held)
            return SSEResponse(body, held, headers=headers)

        requests = [GenRequest(prompt=p, params=with_seed(params, j), adapter=adapter) for p in prompts for j in range(req.n)]

        def run(cancel) -> tuple[list[Generation], list | None]:
            if req.max_tokens == 0:
                gens = [Generation("", c, 0, "length") for c in counts for _ in range(req.n)]
            else:
                gens = engine.generate(requests, cancel=cancel)
            scored = None
            if req.logprobs is not None and not cancel.is_set():
                scored = engine.prompt_logprobs([r.prompt + g.text for r, g in zip(requests, gens)], adapter, req.logprobs)
            return gens, scored

        gens, scored = await unless_gone(request, run)
    choices = []
    for i, (r, g) in enumerate(zip(requests, gens)):
        lp = logprobs_of(r.prompt, g.text, scored[i], req.echo) if scored is not None else None
        choices.append(CompletionChoice(index=i, text=(r.prompt if req.echo else "") + g.text, logprobs=lp, finish_reason=g.finish_reason))
    prompt_tokens = sum(counts)
    completion_tokens = sum(g.completion_tokens for g in gens)
    body = CompletionResponse(
        model=req.model,
        choices=choices,
        usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens),
        kinject_mode=mode,
    )
    return JSONResponse(body.model_dump(), headers=headers)


async def stream_completion(
    state: ServiceState, req: CompletionRequest, prompts: list[str], params: SamplingParams, adapter: str | None, mode: str, include_usage: bool, prompt_tokens: int, slot: Slot
) -> AsyncIterator[str]:
    rid, created = new_id("cmpl"), now()
    skip = set() if include_usage else {"usage"}

    def chunk(index: int, text: str, finish: str | None = None, **extra) -> str:
        body = CompletionStreamResponse(id=rid, created=created, model=req.model, choices=[CompletionChoice(index=index, text=text, finish_reason=finish)], **extra)
        return sse(body, exclude=skip | ({"kinject_mode"} if body.kinject_mode is None else set()))

    completion_tokens = 0
    error = None
    try:
        for pi, prompt in enumerate(prompts):
            for j in range(req.n):
                index = pi * req.n + j
                first = {"kinject_mode": mode} if index == 0 else {}
                if req.echo:
                    yield chunk(index, prompt, **first)
                    first = {}
                if req.max_tokens == 0:
                    yield chunk(index, "", "length", **first)
                    continue
                cancel = threading.Event()
                request = GenRequest(prompt=prompt, params=with_seed(params, j), adapter=adapter)
                finish = "stop"
                async with aclosing(in_thread(state.answerer.engine.stream(request, cancel), cancel)) as pieces:
                    async for piece in pieces:
                        if piece.text:
                            yield chunk(index, piece.text, **first)
                            first = {}
                        if piece.finish_reason:
                            finish = piece.finish_reason
                            completion_tokens += piece.completion_tokens
                yield chunk(index, "", finish, **first)
    except Exception as e:
        error = stream_error(e)
    finally:
        slot.release()  # before the last events, so a client that reads [DONE] finds the slot free

    def usage_chunk() -> str:
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
        return sse(CompletionStreamResponse(id=rid, created=created, model=req.model, choices=[], usage=usage), exclude={"kinject_mode"})

    for event in closing_events(error, usage_chunk if include_usage else None):
        yield event
