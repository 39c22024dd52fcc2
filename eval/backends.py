"""Where the answers come from: the Answerer in this process, or an HTTP endpoint.

Both return the same `Reply` per question, so scoring does not know which one ran.
- `LocalBackend`: the Answerer over an engine, batched, under the answering policy the service
  applies (core.policy: the prompt limit, new tokens fitted into `engine.max_model_len`).
- `KinjectBackend`: a running `kinject serve`; model `kinject-<mode>`, the question as the only
  user message (the server retrieves), `sources` and `kinject_mode` read from the response.
- `OpenAIBackend`: any other OpenAI-compatible server (vLLM...): base mode only, with kinject's
  system prompt so the numbers compare with kinject's `base` mode.

An endpoint gets only the key given for it, `eval.endpoint_api_key`: never `serve.api_key` or
`engine.openai_api_key`, which belong to other servers and would go to whatever URL was typed.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from kinject.core.answer import ALL_MODES, MODEL_PREFIX, Answerer, build_messages, mode_named, model_id, source_dict
from kinject.core.engines import SamplingParams
from kinject.core.errors import KinjectError
from kinject.core.settings import Settings
from kinject.eval.questions import Question

Progress = Callable[[int], None]


class EndpointError(KinjectError):
    pass


@dataclass
class Reply:
    text: str
    mode: str  # the mode that answered (auto resolved)
    sources: list[dict] = field(default_factory=list)
    completion_tokens: int = 0
    latency_s: float = 0.0
    route_reason: str = ""


def conversation(q: Question) -> list[dict]:
    return [{"role": "user", "content": q.question}]


class LocalBackend:
    name = "in-process"

    def __init__(self, answerer: Answerer, settings: Settings):
        self.answerer, self.settings = answerer, settings

    def check(self, mode: str) -> None:
        self.answerer.check(mode)

    def available(self) -> list[str]:
        return self.answerer.available_modes()

    def describe(self) -> dict:
        return {"backend": self.name, "engine": self.answerer.engine.name}

    def answer(self, mode: str, questions: list[Question], params: SamplingParams, progress: Progress | None = None) -> list[Reply]:
        """Answer in chunks of `engine.max_batch_size`; a question's latency is its chunk's wall
        time (retrieval + batched generation), what a client of a batching server waits."""
        out: list[Reply] = []
        step = self.settings.engine.max_batch_size
        for start in range(0, len(questions), step):
            t0 = time.perf_counter()
            prepared = [self.answerer.prepare(mode, conversation(q), params) for q in questions[start : start + step]]
            gens = self.answerer.engine.generate([p.request for p in prepared])
            latency = time.perf_counter() - t0
            for p, g in zip(prepared, gens):
                out.append(Reply(g.text.strip(), p.mode, [source_dict(h) for h in p.hits], g.completion_tokens, latency, p.route_reason))
            if progress:
                progress(len(prepared))
        return out


class _HTTPBackend:
    def __init__(self, endpoint: str, settings: Settings):
        from openai import OpenAI

        self.endpoint = base_url(endpoint)
        self.settings = settings
        key = settings.eval.endpoint_api_key.get_secret_value() or "EMPTY"
        self.client = OpenAI(
            base_url=self.endpoint, api_key=key, timeout=settings.engine.openai_timeout_s, max_retries=settings.engine.openai_max_retries
        )

    def describe(self) -> dict:
        return {"backend": self.name, "endpoint": self.endpoint, "models": self.models}

    def _ask(self, model: str, messages: list[dict], params: SamplingParams):
        import openai

        t0 = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=params.stop or None,
            )
        except openai.APIStatusError as e:
            raise EndpointError(f"{self.endpoint} answered {e.status_code} for model {model!r}: {_message(e)}") from None
        except openai.APIConnectionError as e:
            raise EndpointError(f"cannot reach {self.endpoint}: {e}") from None
        return resp, time.perf_counter() - t0

    def answer(self, mode: str, questions: list[Question], params: SamplingParams, progress: Progress | None = None) -> list[Reply]:
        def one(q: Question) -> Reply:
            reply = self._reply(mode, q, params)
            if progress:
                progress(1)
            return reply

        workers = self.settings.engine.openai_max_concurrency
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, questions))


class KinjectBackend(_HTTPBackend):
    name = "kinject-server"

    def __init__(self, endpoint: str, settings: Settings, models: list[str]):
        super().__init__(endpoint, settings)
        self.models = models

    def available(self) -> list[str]:
        return [mode for mode in map(mode_named, self.models) if mode is not None]

    def check(self, mode: str) -> None:
        if model_id(mode) not in self.models:
            have = ", ".join(m.removeprefix(MODEL_PREFIX) for m in self.models)
            raise EndpointError(f"the kinject server at {self.endpoint} does not serve mode {mode!r}; it serves: {have}")

    def _reply(self, mode: str, q: Question, params: SamplingParams) -> Reply:
        resp, latency = self._ask(model_id(mode), conversation(q), params)
        extra = resp.model_extra or {}
        usage = resp.usage.completion_tokens if resp.usage else 0
        return Reply(
            (resp.choices[0].message.content or "").strip(),
            extra.get("kinject_mode") or mode,
            list(extra.get("sources") or []),
            usage,
            latency,
            extra.get("kinject_route") or "",
        )


class OpenAIBackend(_HTTPBackend):
    name = "openai-compatible"

    def __init__(self, endpoint: str, settings: Settings, models: list[str]):
        super().__init__(endpoint, settings)
        self.models = models
        self.model = settings.engine.openai_model or (models[0] if models else "")
        if not self.model:
            raise EndpointError(f"{self.endpoint} lists no model; name one with --set engine.openai_model=NAME")

    def available(self) -> list[str]:
        return ["base"]

    def check(self, mode: str) -> None:
        if mode != "base":
            raise EndpointError(
                f"{self.endpoint} is not a kinject server (its models: {', '.join(self.models) or 'none'}), so only mode "
                f"'base' can be evaluated there, not {mode!r}"
            )

    def _reply(self, mode: str, q: Question, params: SamplingParams) -> Reply:
        resp, latency = self._ask(self.model, build_messages(conversation(q), None), params)
        usage = resp.usage.completion_tokens if resp.usage else 0
        return Reply((resp.choices[0].message.content or "").strip(), mode, [], usage, latency)


def base_url(endpoint: str) -> str:
    """`http://host:8000`, `.../v1` or `.../v1/` -> `http://host:8000/v1`."""
    url = endpoint.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"the endpoint must be an http(s) URL, got {endpoint!r}")
    return url if url.endswith("/v1") else url + "/v1"


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)


def connect(endpoint: str, settings: Settings) -> _HTTPBackend:
    """A kinject server when it lists `kinject-*` models, else a plain OpenAI-compatible one."""
    import openai

    probe = _HTTPBackend(endpoint, settings)
    try:
        models = [m.id for m in probe.client.models.list().data]
    except openai.APIStatusError as e:
        hint = "; give its key as eval.endpoint_api_key (e.g. KINJECT_EVAL__ENDPOINT_API_KEY=...)" if e.status_code == 401 else ""
        raise EndpointError(f"{probe.endpoint}/models answered {e.status_code}: {_message(e)}{hint}") from None
    except openai.APIConnectionError as e:
        raise EndpointError(f"cannot reach {probe.endpoint}: {e}") from None
    if any(mode_named(m) in ALL_MODES for m in models):
        return KinjectBackend(endpoint, settings, models)
    return OpenAIBackend(endpoint, settings, models)
