"""POST /v1/embeddings: vectors from the KB's own embedder (the one its index was built with),
exactly as documents are embedded for retrieval (core.retrieval.Retriever.embed_documents).

`model` may be the embedder's name (e.g. `minilm-l6`) or any listed `kinject-*` model: every
mode of a KB shares one embedder. `encoding_format: base64` returns little-endian float32 bytes,
as OpenAI does. `dimensions` is accepted only when it equals the embedder's size (truncating a
non-Matryoshka embedding would silently degrade it). Embedding is model work: it runs in one of
the slots generation uses (core.policy.Slots), so it queues, or is refused with a 503, like them.
"""
from __future__ import annotations

import base64

import anyio
import numpy as np
from fastapi import APIRouter, Depends

from kinject.core.answer import ALL_MODES, MODEL_PREFIX
from kinject.service.errors import APIError, bad_request
from kinject.service.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from kinject.service.state import ServiceState, get_state

router = APIRouter()
MAX_INPUTS = 2048


def inputs_of(req: EmbeddingRequest) -> list[str]:
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts:
        raise bad_request("input must not be empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise bad_request("token-id inputs are not supported: send text", param="input")
    if any(not t.strip() for t in texts):
        raise bad_request("input strings must not be empty", param="input")
    if len(texts) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", param="input")
    return texts


@router.post("/v1/embeddings")
async def create_embeddings(req: EmbeddingRequest, state: ServiceState = Depends(get_state)) -> EmbeddingResponse:
    texts = inputs_of(req)
    async with state.slots.slot():
        retriever = state.answerer.retriever
        embedder = await anyio.to_thread.run_sync(lambda: retriever.embedder)  # the index's own, loaded once
        name = embedder.ref
        if req.model != name and req.model.removeprefix(MODEL_PREFIX) not in ALL_MODES:
            raise APIError(404, f"the embedding model {req.model!r} does not exist; use {name!r} (or any kinject-* model)", param="model", code="model_not_found")
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise bad_request(f"dimensions must be {embedder.dim} for {name!r} (it cannot be truncated)", param="dimensions")

        def embed() -> tuple[np.ndarray, int]:
            vectors = np.asarray(retriever.embed_documents(texts), dtype=np.float32)
            with embedder._lock:  # the counting tokenizer is not safe to share between threads
                tokens = sum(len(ids) for ids in embedder.tokenizer(texts)["input_ids"])
            return vectors, tokens

        vectors, tokens = await anyio.to_thread.run_sync(embed)
    data = []
    for i, v in enumerate(vectors):
        emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
        data.append(EmbeddingData(index=i, embedding=emb))
    return EmbeddingResponse(data=data, model=req.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
