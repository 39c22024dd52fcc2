"""One answering policy (kinject.core.policy) behind every front end: the same question in the
same mode reaches the engine as the same prompt, token for token, with the same new-token limit,
whether it comes through the HTTP API (the official `openai` client against the real server),
the UI (`gradio_client` against the chat and compare tabs mounted on that server) or eval (the
in-process `evaluate`, short answers and multiple choice).

The prompts are read at the engine: `Recording` wraps the session's real engine, notes what each
request makes it read, then lets it generate. The KB's settings give the model a 256-token
context, so a long question is fitted: passages are dropped and the answer's tokens clamped."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.conftest import REPO, running

DEMO_DOCS = ["founding-of-vaskarra.md", "gull-rock-lighthouse.md", "the-tern-currency.md"]
MODES = ["base", "rag"]
SHORT = "When was the Gull Rock lighthouse built?"
# A 256-token context over 80-token chunks: the short question fits both passages, and every
# prompt stays short (prefill is most of each answer's time here).
MAX_MODEL_LEN, MAX_NEW, TOP_K, CHUNK = 256, 8, 2, 80
FILLER = (
    "I am reading an old harbour ledger that lists every keeper, every storm and every repair "
    "to the lamp, the stairs and the seaward wall, year after year, and I keep losing the thread, "
)


# ---- the policy's rules ---------------------------------------------------------------------------
def test_prompt_limit_and_new_tokens_follow_both_settings():
    from kinject.core.policy import PromptTooLong, check_prompt, new_tokens, prompt_limit
    from kinject.core.settings import load_settings

    s = load_settings({"engine": {"max_model_len": 1024}, "serve": {"max_prompt_tokens": 1536, "max_new_tokens": 100}})
    assert prompt_limit(s) == 1023  # the context, less one token for the answer
    assert prompt_limit(load_settings({"serve": {"max_prompt_tokens": 300}})) == 300
    check_prompt(1023, s)
    with pytest.raises(PromptTooLong) as e:
        check_prompt(1024, s)
    assert (e.value.tokens, e.value.limit) == (1024, 1023)
    assert new_tokens(500, 10, s) == 100  # serve.max_new_tokens
    assert new_tokens(50, 1000, s) == 24  # the room the prompt leaves
    assert new_tokens(50, 1023, s) == 1  # never below one


# ---- the same prompt through every front end ------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """What the engine was asked to read for one request."""

    text: str  # the rendered prompt (chat template applied)
    ids: tuple[int, ...]  # the token ids the engine reads
    max_new_tokens: int | None  # None for a scored context (multiple choice)
    adapter: str | None


class Recording:
    """The session's real engine, noting each request's prompt before it generates or scores."""

    def __init__(self, engine):
        self.engine = engine
        self.seen: list[Seen] = []
        self.scored: list[Seen] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _note(self, request) -> Seen:
        from kinject.core.engines.base import encode_request

        ids = tuple(encode_request(self.engine.tokenizer, request))
        return Seen(self.engine.render(request), ids, request.params.max_new_tokens, request.adapter)

    def generate(self, requests, progress=None, cancel=None):
        self.seen += [self._note(r) for r in requests]
        return self.engine.generate(requests, progress=progress, cancel=cancel)

    def stream(self, request, cancel=None):
        self.seen.append(self._note(request))
        return self.engine.stream(request, cancel)

    def loglikelihood(self, pairs, adapter=None):
        contexts = dict.fromkeys(ctx for ctx, _ in pairs)  # a question's choices share its context
        tokenize = self.engine.tokenizer  # as the engine reads a context: its template markers are special tokens
        self.scored += [Seen(ctx, tuple(tokenize(ctx, add_special_tokens=False)["input_ids"]), None, adapter) for ctx in contexts]
        return self.engine.loglikelihood(pairs, adapter=adapter)

    def take(self) -> list[Seen]:
        seen, self.seen = self.seen, []
        return seen


def long_question(engine, settings) -> str:
    """A question whose base-mode prompt leaves the answer fewer than serve.max_new_tokens tokens
    of the context: no passage fits beside it, and the answer's tokens are clamped."""
    from kinject.core.answer import build_messages
    from kinject.core.engines import GenRequest

    def tokens(q: str) -> int:
        return engine.prompt_tokens(GenRequest(messages=build_messages([{"role": "user", "content": q}], None)))

    target = settings.engine.max_model_len - settings.serve.max_new_tokens // 2
    words = (FILLER * 40).split()
    n = next(n for n in range(1, len(words)) if tokens(" ".join(words[:n]) + " so: who first lit the lamp?") >= target)
    question = " ".join(words[:n]) + " so: who first lit the lamp?"
    assert settings.engine.max_model_len - settings.serve.max_new_tokens < tokens(question) < settings.engine.max_model_len
    return question


@pytest.fixture(scope="module")
def policy_kb(tmp_path_factory):
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.ingest.pipeline import ingest

    corpus = tmp_path_factory.mktemp("corpus")
    for name in DEMO_DOCS:
        shutil.copy(REPO / "demo" / "corpus" / name, corpus / name)
    settings = load_settings(
        {
            "kb_root": str(tmp_path_factory.mktemp("kbs")),
            "engine": {"max_model_len": MAX_MODEL_LEN},
            "serve": {"max_new_tokens": MAX_NEW},
            "eval": {"max_new_tokens": MAX_NEW},
            "retrieval": {"top_k": TOP_K},
            "ingest": {"chunk_size": CHUNK, "chunk_overlap": 8},
        }
    )
    kb = KB.create(settings, "policy")
    ingest(kb, corpus, settings, progress=False)
    return kb, settings


@pytest.fixture(scope="module")
def asked(policy_kb, engine, tmp_path_factory):
    """{(front end, mode, question): what the engine read}, for both questions in both modes,
    through the API, the UI's chat tab and eval (answers and multiple choice); and
    {question: what the engine read} for the UI's compare tab, which asks in every mode at once."""
    import openai
    from gradio_client import Client

    from kinject.core.answer import model_id
    from kinject.eval.run import evaluate
    from kinject.recipes.serve import service_app

    kb, settings = policy_kb
    recording = Recording(engine)
    questions = {"short": SHORT, "long": long_question(engine, settings)}
    seen: dict[tuple[str, str, str], Seen] = {}
    compared: dict[str, list[Seen]] = {}
    sources: dict[tuple[str, str], int] = {}

    with running(service_app(kb, settings, recording)) as url:
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        ui = Client(url + "/ui/", verbose=False)
        try:
            for name, q in questions.items():
                for mode in MODES:
                    r = api.chat.completions.create(model=model_id(mode), messages=[{"role": "user", "content": q}])
                    (seen["api", mode, name],) = recording.take()
                    sources[mode, name] = len(r.model_extra["sources"])
                    ui.reset_session()
                    ui.predict(q, mode, api_name="/chat")
                    (seen["ui-chat", mode, name],) = recording.take()
                ui.predict(q, api_name="/compare")
                compared[name] = recording.take()
        finally:
            ui.close()

    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    rows = [{"qid": f"{name}-short", "question": q, "answer": "1871"} for name, q in questions.items()]
    rows += [{"qid": f"{name}-mc", "question": q, "choices": ["in 1871", "in 1907"], "answer_index": 0} for name, q in questions.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode in MODES:
        evaluate(kb, path, [mode], settings, progress=False, engine=recording)
        answered, scored = recording.take(), recording.scored
        recording.scored = []
        assert len(answered) == len(scored) == len(questions)
        for name, q in questions.items():
            (seen["eval", mode, name],) = [s for s in answered if q in s.text]
            (seen["eval-mc", mode, name],) = [s for s in scored if q in s.text]
    return seen, compared, sources, settings


@pytest.mark.parametrize("question", ["short", "long"])
@pytest.mark.parametrize("mode", MODES)
def test_every_front_end_sends_the_same_prompt(asked, mode, question):
    seen, _, _, _ = asked
    api = seen["api", mode, question]
    for front in ("ui-chat", "eval"):
        got = seen[front, mode, question]
        assert got.text == api.text, f"{front} rendered another prompt than the API"
        assert got.ids == api.ids, f"{front} sent other tokens than the API"
        assert (got.max_new_tokens, got.adapter) == (api.max_new_tokens, api.adapter), front
    scored = seen["eval-mc", mode, question]  # multiple choice scores its choices after the same prompt
    assert (scored.text, scored.ids, scored.adapter) == (api.text, api.ids, api.adapter)


@pytest.mark.parametrize("question", ["short", "long"])
def test_the_compare_tab_sends_the_api_prompts(asked, question):
    """The KB has no adapter: compare answers in base and rag, concurrently, in either order."""
    seen, compared, _, _ = asked
    assert Counter(compared[question]) == Counter(seen["api", mode, question] for mode in MODES)


def test_the_long_question_is_fitted_and_the_short_one_is_not(asked):
    from kinject.core.policy import prompt_limit

    seen, _, sources, settings = asked
    for mode in MODES:
        short, long = seen["api", mode, "short"], seen["api", mode, "long"]
        assert short.max_new_tokens == MAX_NEW and len(long.ids) <= prompt_limit(settings)
        assert long.max_new_tokens == MAX_MODEL_LEN - len(long.ids) < MAX_NEW  # clamped to the room left
    assert sources["rag", "short"] == TOP_K and sources["rag", "long"] == 0  # the passages did not fit beside it
    assert seen["api", "rag", "long"].text == seen["api", "base", "long"].text
