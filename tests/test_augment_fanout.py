"""Augmentation over several OpenAI-compatible endpoints (engine.openai_base_urls): two kinject
servers, `kinject serve` in a child process SIGKILLed mid-run and the same app in this process,
the run finishing on the live one with every planned sample exactly once; and the engine alone
over real local HTTP: a stdlib server that answers, one that answers only 503, and a closed port."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from contextlib import ExitStack

import pytest

from kinject.augment import AugmentError, augment
from kinject.core.engines import GenRequest, SamplingParams, make_engine
from kinject.core.engines.openai_engine import OpenAIEngineError
from kinject.core.engines.openai_fleet import OpenAIFleetEngine
from kinject.core.files import read_jsonl
from kinject.core.kb import KB
from kinject.core.settings import SPA_TYPES, load_settings
from tests.conftest import REPO, copy_kb, running
from tests.test_api_abuse import kinject_serve
from tests.test_engine_openai import scripted

HI = [GenRequest(messages=[{"role": "user", "content": f"hi {i}"}], params=SamplingParams(max_new_tokens=4)) for i in range(6)]
FAST_GIVE_UP = {"openai_model": "m", "openai_max_retries": 1, "openai_retry_backoff_s": 0.01, "openai_max_concurrency": 2}


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


def fleet_settings(urls: list[str], more: dict | None = None, **engine):
    return load_settings({"engine": {"backend": "openai", "openai_base_urls": urls, **FAST_GIVE_UP, **engine}, **(more or {})})


def _keys(samples: list[dict]) -> list[tuple]:
    return [(s["doc_id"], s["type"], s["sample_index"]) for s in samples]


# ---- the engine over real local HTTP, no model -----------------------------------------------
def test_a_dead_endpoints_requests_are_answered_by_the_live_one():
    dead = closed_port_url()
    with scripted([]) as (server, live):
        eng = make_engine(fleet_settings([dead, live]))
        assert isinstance(eng, OpenAIFleetEngine)
        done: list[int] = []
        out = eng.generate(HI, progress=done.append)
        assert [g.text for g in out] == ["hello"] * len(HI) and sum(done) == len(HI)
        assert {g.endpoint for g in out} == {live} and server.hits == len(HI)
        assert eng.endpoints == {dead: "dead", live: "live"}
        server.hits = 0
        eng.generate(HI[:2])  # dead for the rest of the run: nothing more is sent there
        assert server.hits == 2
        eng.close()


def test_every_endpoint_down_fails_naming_each_url():
    refused = closed_port_url()
    with scripted([503] * 100) as (server, busy):
        eng = make_engine(fleet_settings([refused, busy]))
        t0 = time.monotonic()
        with pytest.raises(OpenAIEngineError, match="every endpoint of engine.openai_base_urls is down") as err:
            eng.generate(HI)
        msg = str(err.value)
        assert f"{refused} did not answer" in msg and f"{busy} did not answer the chat request after 2 attempts (503: scripted 503)" in msg
        assert eng.endpoints == {refused: "dead", busy: "dead"} and time.monotonic() - t0 < 10
        eng.close()


def test_every_endpoint_down_fails_the_augment_run_clearly(demo_index, tmp_path):
    copy_kb(demo_index, tmp_path / "kbs", "down")
    urls = [closed_port_url(), closed_port_url()]
    more = {"kb_root": str(tmp_path / "kbs"), "augment": {"types": SPA_TYPES, "budget_tokens": 200, "max_new_tokens": 16}}
    settings = fleet_settings(urls, more, openai_model="kinject-base")
    kb = KB.open(settings, "down")
    with pytest.raises(AugmentError, match=r"every endpoint of engine.openai_base_urls is down.*samples generated so far are kept") as err:
        augment(kb, settings, progress=False)
    assert all(u in str(err.value) for u in urls)
    assert not (kb.dir("augment") / "samples.jsonl").exists() and kb.stage("augment") is None


# ---- two servers, the one in a child process killed mid-run ------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(3600)  # on two cores shared with other work a server has taken over 10 minutes to start
def test_augment_finishes_when_one_of_two_servers_is_killed(demo_index, engine, tmp_path):
    from kinject.service.app import create_app
    from tests.crashpoint import forked

    root = tmp_path / "kbs"
    for name in ("a", "b", "fanout"):
        copy_kb(demo_index, root, name)
    with ExitStack() as stack:
        b, b_pid = stack.enter_context(kinject_serve(root, tmp_path / "serve-b.log", kb="b", start_timeout=1500))
        served = load_settings({"kb_root": str(root)})
        a = stack.enter_context(running(create_app(KB.open(served, "a"), served, engine)))
        urls = [f"{a}/v1", f"{b}/v1"]
        engine = {
            "backend": "openai",
            "openai_base_urls": urls,
            "openai_model": "kinject-base",
            "openai_max_concurrency": 2,
            "openai_max_retries": 1,
            "openai_retry_backoff_s": 0.2,
            "openai_timeout_s": 900,  # a server that is merely slow (a busy machine) is not dead; a killed one refuses at once
        }
        sets = [f"engine.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in engine.items()]
        sets += ["augment.samples_per_call=4", f"augment.types={json.dumps(SPA_TYPES)}"]
        argv = [arg for s in sets for arg in ("--set", s)] + ["augment", "--kb", "fanout", "--budget", "240", "--max-new-tokens", "24", "--no-progress"]
        env = {**os.environ, "KINJECT_KB_ROOT": str(root), "PYTHONPATH": str(REPO)}
        samples_path = root / "fanout" / "synthetic" / "samples.jsonl"
        log = tmp_path / "augment.log"
        t0 = time.monotonic()
        run = forked(argv, env, log, REPO)
        while not (samples_path.exists() and samples_path.stat().st_size) and run.poll() is None and time.monotonic() - t0 < 1200:
            time.sleep(0.05)
        before_kill = len(read_jsonl(samples_path))
        assert before_kill and run.poll() is None, "no samples yet, or augment ended before the kill:\n" + log.read_text()
        os.kill(b_pid, signal.SIGKILL)  # mid-run: the next chunk is already in flight on both servers
        killed_after = len(read_jsonl(samples_path))  # the same, unless a chunk landed in between
        run.wait(600)
        out = log.read_text()
        assert run.returncode == 0, out
        print(f"augment over two servers, one killed after {killed_after} samples: {time.monotonic() - t0:.0f} s")

        samples = read_jsonl(samples_path)
        keys = _keys(samples)
        assert len(keys) == len(set(keys)) > killed_after  # nothing twice, and the run went on after the kill
        report = json.loads((root / "fanout" / "synthetic" / "report.json").read_text())
        rows = report["run"]["endpoints"]
        assert rows == {urls[0]: {"samples": rows[urls[0]]["samples"], "dead": False}, urls[1]: {"samples": rows[urls[1]]["samples"], "dead": True}}
        assert rows[urls[0]]["samples"] + rows[urls[1]]["samples"] == report["run"]["new_samples"] == len(samples)
        assert 0 < rows[urls[1]]["samples"] <= killed_after  # the killed server wrote only what was stored before its death
        assert [s["endpoint"] for s in samples[killed_after:]] == [urls[0]] * (len(samples) - killed_after)
        assert f"endpoint {urls[1]} is down" in out and "dead" in out  # the warning and the printed report

        # The plan replayed over what is stored needs nothing more and leaves nothing unused:
        # the stored keys are exactly the plan's, none missing.
        settings = load_settings({
            "kb_root": str(root),
            "engine": engine,
            "augment": {"types": SPA_TYPES, "samples_per_call": 4, "budget_tokens": 240, "max_new_tokens": 24},
        })
        again = augment(KB.open(settings, "fanout"), settings, progress=False)
        assert again.new_samples == 0 and again.report["unused_samples"] == 0 and again.report["samples"] == len(samples)
        assert _keys(read_jsonl(samples_path)) == keys

        # Scoring and streaming move past the dead endpoint too.
        eng = make_engine(load_settings({"engine": {**engine, "openai_base_urls": [urls[1], urls[0]]}}))
        (score,) = eng.loglikelihood([("The capital of France is", " Paris")])
        chunks = list(eng.stream(GenRequest(prompt="The capital of France is", params=SamplingParams(max_new_tokens=4))))
        assert score[0] < 0 and chunks[-1].completion_tokens == 4
        assert eng.endpoints == {urls[1]: "dead", urls[0]: "live"}
        eng.close()
