"""The openai engine over real HTTP: the kinject service (uvicorn on a free loopback port, the
bundled 135M model) for generation, streaming, scoring and adapters; tiny stdlib HTTP servers that
answer 503/429/400 on cue for the retry policy; and a closed port for an unreachable endpoint."""
from __future__ import annotations

import http.server
import importlib.util
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from kinject.core.engines import GenRequest, SamplingParams, make_engine
from kinject.core.engines.openai_engine import OpenAIEngine, OpenAIEngineError
from kinject.core.settings import load_settings
from tests.conftest import attach_untrained_lora
from tests.conftest import running

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CONTEXT = "The capital of France is"


def openai_settings(url: str, **engine):
    return load_settings({"engine": {"backend": "openai", "openai_base_url": url, **engine}})


@pytest.fixture(scope="module")
def kinject_url(tmp_path_factory, engine):
    """The kinject service on a KB with an (untrained, random) adapter: models kinject-base and kinject-ft."""
    if importlib.util.find_spec("kinject.service.app") is None:
        pytest.skip("the kinject service (service.app) is not part of this build")
    from kinject.core.kb import KB
    from kinject.service.app import create_app

    settings = load_settings({"kb_root": str(tmp_path_factory.mktemp("openai-kbs"))})
    kb = KB.create(settings, "remote")
    attach_untrained_lora(kb, settings)
    with running(create_app(kb, settings, engine)) as base_url:
        url = f"{base_url}/v1"
        yield url


@pytest.fixture(scope="module")
def remote(kinject_url):
    eng = make_engine(openai_settings(kinject_url, openai_model="kinject-base", openai_max_concurrency=2))
    yield eng
    eng.close()


def test_generates_like_the_engine_behind_the_server(remote, engine):
    assert isinstance(remote, OpenAIEngine)
    # The service frames chat messages with its own prompt; a raw prompt goes through
    # /v1/completions untouched, so its greedy text equals the local engine's.
    chat = remote.generate([GenRequest(messages=FRANCE, params=SamplingParams(max_new_tokens=4))])[0]
    assert chat.text and chat.completion_tokens == 4 and chat.finish_reason == "length"
    prompts = [GenRequest(prompt=p, params=SamplingParams(max_new_tokens=8)) for p in (CONTEXT, "Once upon a time")]
    done = []
    got = remote.generate(prompts, progress=done.append)
    want = engine.generate(prompts)
    assert [g.text for g in got] == [w.text for w in want]
    assert "Paris" in got[0].text
    assert sum(done) == len(prompts)
    assert got[0].prompt_tokens == engine.count_tokens(CONTEXT) == remote.count_tokens(CONTEXT)
    assert got[0].completion_tokens == want[0].completion_tokens


def test_stream_yields_the_generated_text(remote):
    request = GenRequest(messages=FRANCE, params=SamplingParams(max_new_tokens=8))
    chunks = list(remote.stream(request))
    whole = remote.generate([request])[0]
    assert len(chunks) > 2 and "".join(c.text for c in chunks) == whole.text
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (whole.finish_reason, whole.prompt_tokens, whole.completion_tokens)


def test_loglikelihood_from_echoed_logprobs_matches_local_scoring(remote, engine):
    pairs = [(CONTEXT, " Paris"), (CONTEXT, " Berlin"), (CONTEXT + " ", "Paris")]
    got = remote.loglikelihood(pairs)
    want = engine.loglikelihood(pairs)
    assert got[0][0] > got[1][0]
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-3) and g_greedy == w_greedy
    (row,) = remote.prompt_logprobs([CONTEXT + " Paris"], top=2)
    (local,) = engine.prompt_logprobs([CONTEXT + " Paris"], top=2)
    assert "".join(t.token for t in row) == CONTEXT + " Paris"
    assert row[0].logprob is None and len(row[-1].top) == 2
    assert [t.logprob for t in row[1:]] == pytest.approx([t.logprob for t in local[1:]], abs=1e-3)


def test_adapter_is_sent_as_the_served_model_name(remote):
    remote.add_adapter("tuned", "kinject-ft")
    assert remote.adapters == ["tuned"]
    base, tuned = remote.loglikelihood([(CONTEXT, " Paris")])[0][0], remote.loglikelihood([(CONTEXT, " Paris")], adapter="tuned")[0][0]
    assert abs(base - tuned) > 1e-3  # the server ran its LoRA
    with pytest.raises(KeyError, match="unknown adapter"):
        remote.generate([GenRequest(prompt=CONTEXT, adapter="missing")])


def test_unknown_model_is_a_4xx_without_retries(kinject_url, monkeypatch):
    from types import SimpleNamespace

    from kinject.core.engines import openai_engine

    slept: list[float] = []  # the backoffs asked for, not a clock that a busy machine slows
    monkeypatch.setattr(openai_engine, "time", SimpleNamespace(sleep=slept.append))
    eng = OpenAIEngine(openai_settings(kinject_url, openai_model="kinject-nope", openai_retry_backoff_s=5.0))
    with pytest.raises(OpenAIEngineError, match=r"refused the completion request \(404\)") as err:
        eng.generate([GenRequest(prompt=CONTEXT, params=SamplingParams(max_new_tokens=2))])
    assert kinject_url in str(err.value) and slept == []  # no retry
    eng.close()


# ---- retry policy against scripted stdlib servers ----------------------------------------------
CHAT_OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class _Scripted(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        script = self.server.script
        status = script.pop(0) if script else 200
        self.server.hits += 1
        body = CHAT_OK if status == 200 else {"error": {"message": f"scripted {status}", "type": "x", "param": None, "code": None}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def scripted(statuses: list[int]):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.hits = list(statuses), 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _chat(eng: OpenAIEngine):
    return eng.generate([GenRequest(messages=[{"role": "user", "content": "hi"}], params=SamplingParams(max_new_tokens=4))])


@pytest.mark.parametrize("statuses", [[503, 503], [429], [500, 502]])
def test_retries_on_429_and_5xx_then_succeeds(statuses):
    with scripted(statuses) as (server, url):
        eng = OpenAIEngine(openai_settings(url, openai_model="m", openai_max_retries=3, openai_retry_backoff_s=0.05))
        t0 = time.monotonic()
        (gen,) = _chat(eng)
        assert gen.text == "hello" and gen.prompt_tokens == 3
        assert server.hits == len(statuses) + 1
        assert time.monotonic() - t0 >= 0.05 * (2 ** len(statuses) - 1)  # backoff doubled each time
        eng.close()


def test_gives_up_after_max_retries_naming_the_url():
    with scripted([503] * 10) as (server, url):
        eng = OpenAIEngine(openai_settings(url, openai_model="m", openai_max_retries=2, openai_retry_backoff_s=0.01))
        with pytest.raises(OpenAIEngineError, match=r"did not answer the chat request after 3 attempts \(503: scripted 503\)") as err:
            _chat(eng)
        assert url in str(err.value) and server.hits == 3
        eng.close()


def test_a_400_is_not_retried():
    with scripted([400]) as (server, url):
        eng = OpenAIEngine(openai_settings(url, openai_model="m", openai_max_retries=3, openai_retry_backoff_s=0.01))
        with pytest.raises(OpenAIEngineError, match=r"refused the chat request \(400\): scripted 400"):
            _chat(eng)
        assert server.hits == 1
        eng.close()


def test_unreachable_endpoint_fails_quickly_after_bounded_retries():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    eng = OpenAIEngine(openai_settings(url, openai_model="m", openai_max_retries=2, openai_retry_backoff_s=0.01))
    t0 = time.monotonic()
    with pytest.raises(OpenAIEngineError, match="after 3 attempts") as err:
        _chat(eng)
    assert url in str(err.value) and time.monotonic() - t0 < 10
    eng.close()


def test_needs_a_base_url():
    with pytest.raises(OpenAIEngineError, match="engine.openai_base_url"):
        make_engine(load_settings({"engine": {"backend": "openai"}}))
