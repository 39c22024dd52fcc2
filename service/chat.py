"""POST /v1/chat/completions: a conversation answered in the mode the `model` field names.

The request is checked, then a slot is taken (or a 503), then retrieval (rag modes, auto) and the
prompt are prepared, so every input error is a plain 4xx before any streaming starts; then the
engine answers in the same slot.
Responses carry `sources` and `kinject_mode` (also in the `x-kinject-mode` header); streamed
responses put them on the first chunk.
"""
from __future__ import annotations

import dataclasses
import threading
from contextlib import aclosing
from typing import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from kinject.core.answer import Prepared, source_dict, with_seed
from kinject.core.engines import SamplingParams
from kinject.core.policy import Slot
from kinject.service.errors import bad_request
from kinject.service.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    ResponseMessage,
    Source,
    UsageInfo,
    new_id,
    now,
)
from kinject.service.sampling import check_choices, max_new_tokens, sampling_params
from kinject.service.state import ServiceState, get_state
from kinject.service.streaming import SSEResponse, closing_events, in_thread, sse, stream_error, unless_gone

router = APIRouter()


def conversation_of(req: ChatCompletionRequest, max_messages: int) -> list[dict]:
    if len(req.messages) > max_messages:
        raise bad_request(f"too many messages: {len(req.messages)} > {max_messages} (serve.max_messages)", param="messages", code="too_many_messages")
    if req.tools:
        raise bad_request("tools are not supported by kinject", param="tools")
    if req.logprobs:
        raise bad_request("logprobs are not supported on chat completions; use /v1/completions with logprobs", param="logprobs")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format type 'text' is supported", param="response_format")
    conv = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        conv.append({"role": role, "content": m.text()})
    if not any(m["role"] == "user" and m["content"].strip() for m in conv):
        raise bad_request("the conversation needs at least one non-empty user message", param="messages")
    return conv


def checked_params(state: ServiceState, req: ChatCompletionRequest) -> SamplingParams:
    wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    check_choices(req.n, state.settings)
    return sampling_params(req, max_new_tokens(wanted, state.settings, param=param), state.settings)


async def prepare(state: ServiceState, req: ChatCompletionRequest, conv: list[dict], params: SamplingParams) -> Prepared:
    def run() -> Prepared:  # reads the manifest, may load a new adapter, retrieves: off the event loop
        return state.answerer.prepare(state.mode_for(req.model), conv, params)

    return await anyio.to_thread.run_sync(run)


def sources_of(prepared: Prepared) -> list[Source]:
    return [Source(**source_dict(h)) for h in prepared.hits]


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, state: ServiceState = Depends(get_state)):
    conv = conversation_of(req, state.settings.serve.max_messages)
    params = checked_params(state, req)
    async with state.slots.slot() as slot:  # retrieval and tokenizing are model work too
        prepared = await prepare(state, req, conv, params)
        headers = {"x-kinject-mode": prepared.mode}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            held = slot.pass_on()
            return SSEResponse(stream_chat(state, req, prepared, include_usage, held), held, headers=headers)
        answers = await unless_gone(request, lambda cancel: state.answerer.generate(prepared, req.n, cancel))
    usage = UsageInfo(
        prompt_tokens=answers[0].prompt_tokens,
        completion_tokens=sum(a.completion_tokens for a in answers),
    )
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    body = ChatCompletionResponse(
        model=req.model,
        choices=[
            ChatCompletionChoice(index=i, message=ResponseMessage(content=a.text), finish_reason=a.finish_reason)
            for i, a in enumerate(answers)
        ],
        usage=usage,
        sources=sources_of(prepared),
        kinject_mode=prepared.mode,
        kinject_route=prepared.route_reason or None,
    )
    return JSONResponse(body.model_dump(), headers=headers)


async def stream_chat(state: ServiceState, req: ChatCompletionRequest, prepared: Prepared, include_usage: bool, slot: Slot) -> AsyncIterator[str]:
    rid, created = new_id("chatcmpl"), now()
    # OpenAI sends "usage": null on every chunk but the last when usage was asked for.
    skip = set() if include_usage else {"usage"}

    def chunk(index: int, delta: DeltaMessage, finish: str | None = None, **extra) -> str:
        body = ChatCompletionStreamResponse(
            id=rid, created=created, model=req.model,
            choices=[ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish)], **extra,
        )
        data = body.model_dump(exclude=skip | {k for k in ("sources", "kinject_mode", "kinject_route") if getattr(body, k) is None})
        data["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # OpenAI: {} on the last chunk
        return sse(data)

    prompt_tokens = completion_tokens = 0
    error = None
    try:
        for i in range(req.n):
            first = {"sources": sources_of(prepared), "kinject_mode": prepared.mode, "kinject_route": prepared.route_reason or None} if i == 0 else {}
            yield chunk(i, DeltaMessage(role="assistant", content=""), **first)
            request = dataclasses.replace(prepared.request, params=with_seed(prepared.request.params, i))
            cancel = threading.Event()
            finish = "stop"
            async with aclosing(in_thread(state.answerer.stream_prepared(dataclasses.replace(prepared, request=request), cancel), cancel)) as pieces:
                async for piece in pieces:
                    if piece.text:
                        yield chunk(i, DeltaMessage(content=piece.text))
                    if piece.finish_reason:
                        finish = piece.finish_reason
                        prompt_tokens = piece.prompt_tokens
                        completion_tokens += piece.completion_tokens
            yield chunk(i, DeltaMessage(), finish)
    except Exception as e:  # headers are sent: report in the stream, as OpenAI does
        error = stream_error(e)
    finally:
        slot.release()  # before the last events, so a client that reads [DONE] finds the slot free

    def usage_chunk() -> str:
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
        return sse(ChatCompletionStreamResponse(id=rid, created=created, model=req.model, choices=[], usage=usage), exclude={"sources", "kinject_mode", "kinject_route"})

    for event in closing_events(error, usage_chunk if include_usage else None):
        yield event
