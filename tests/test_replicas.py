"""Serving replicas: two `kinject serve` processes on one KB folder, as behind a load balancer on a
shared disk. A `kinject ingest` and a `kinject train` run beside them (the real CLI, in child
processes) while a thread keeps asking both; each replica picks the new index and the new adapter
up without a restart, every answer meanwhile comes from the whole old one or the whole new one,
and none fails. Clients are the official `openai` package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import openai
import pytest

from conftest import DEMO_DOCS, REPO, copy_kb, running
from test_api_abuse import kinject_serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # generous: a loaded 2-core machine starts servers slowly

NEW_DOC = "ferry-timetable.md"
NEW_TEXT = "# Ferry timetable\n\nThe Orlenne ferry leaves the harbour at 7:15 every morning and returns at 19:40.\n"
QUESTION = "When does the Orlenne ferry leave the harbour in the morning?"
FT_PROMPT = "The Brightwater glassworks was founded by"
SETS = ("retrieval.top_k=3", "serve.max_new_tokens=16")
# Between rounds of probes: a swap still falls between many probes, and the replicas leave the
# two cores to the ingest or training run they probe (and to the other test worker).
PROBE_PAUSE_S = 0.2


@pytest.fixture(scope="module")
def kb_root(demo_index_lora, tmp_path_factory) -> Path:
    """A KB root holding a copy of the session's demo KB (three documents, an untrained adapter)."""
    root = tmp_path_factory.mktemp("replicas") / "kbs"
    copy_kb(demo_index_lora, root, "demo")
    return root


@pytest.fixture(scope="module")
def replicas(kb_root) -> list[openai.OpenAI]:
    """Two `kinject serve` processes on the same KB folder, started side by side; an `openai`
    client for each."""
    servers = [kinject_serve(kb_root, kb_root.parent / f"serve-{i}.log", *SETS, start_timeout=1800) for i in range(2)]
    with ExitStack() as stack, ThreadPoolExecutor(len(servers)) as pool:
        started = [pool.submit(server.__enter__) for server in servers]
        for server, future in zip(servers, started):
            if future.exception() is None:
                stack.push(server)  # stopped on the way out, also when the other failed to start
        yield [client_of(future.result()[0]) for future in started]


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def kinject(kb_root: Path, *args: str) -> str:
    """The real `kinject` CLI in a child process on the replicas' KB root; its output."""
    env = {**os.environ, "KINJECT_KB_ROOT": str(kb_root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "kinject.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rag_answer(client: openai.OpenAI, max_tokens: int = 16) -> tuple[str, tuple]:
    """(answer, its sources as (doc_id, chunk_id, score) in rank order) for QUESTION in rag mode."""
    r = client.chat.completions.create(
        model="kinject-rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0
    )
    sources = tuple((s["doc_id"], s["chunk_id"], s["score"]) for s in r.model_extra["sources"])
    return r.choices[0].message.content, sources


def ft_continuation(client: openai.OpenAI) -> tuple[str, tuple]:
    """(text, logprob of each generated token) of FT_PROMPT continued greedily with the adapter.
    The logprobs tell two adapters apart even where their greedy text is the same."""
    r = client.completions.create(model="kinject-ft", prompt=FT_PROMPT, max_tokens=4, temperature=0, logprobs=1)
    choice = r.choices[0]
    assert r.model_extra["kinject_mode"] == "ft"
    return choice.text, tuple(choice.logprobs.token_logprobs)


def same_continuation(a: tuple[str, tuple], b: tuple[str, tuple], tol: float = 1e-4) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(abs(x - y) <= tol for x, y in zip(a[1], b[1]))


class Prober:
    """A thread asking every replica in turn, over and over, until the block ends: each answer,
    with when it was asked, and each error."""

    def __init__(self, clients: list[openai.OpenAI], ask):
        self.clients, self.ask = clients, ask
        self.answers: list[tuple[int, float, object]] = []  # (replica, asked at, answer)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, client in enumerate(self.clients):
                asked = time.monotonic()
                try:
                    self.answers.append((i, asked, self.ask(client)))
                except Exception as e:  # every failure is a finding: none is expected
                    self.errors.append(f"replica {i}: {type(e).__name__}: {e}")
            self._stop.wait(PROBE_PAUSE_S)

    def asked_each_after(self, moment: float, timeout: float = 300) -> None:
        """Wait until every replica has answered a question asked after `moment`."""
        deadline = time.monotonic() + timeout
        while {i for i, asked, _ in self.answers if asked > moment} != set(range(len(self.clients))):
            assert time.monotonic() < deadline and self._thread.is_alive(), "the probes stopped answering"
            time.sleep(0.2)

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(300)


def test_an_ingest_reaches_both_replicas_whole(replicas, kb_root, tmp_path):
    before = [rag_answer(c) for c in replicas]
    assert before[0] == before[1]
    assert NEW_DOC not in {doc for doc, _, _ in before[0][1]}

    corpus = tmp_path / "corpus"  # the KB's documents and the new one
    corpus.mkdir()
    for name in DEMO_DOCS:
        shutil.copy(REPO / "demo" / "corpus" / name, corpus / name)
    (corpus / NEW_DOC).write_text(NEW_TEXT)
    with Prober(replicas, lambda c: rag_answer(c, max_tokens=1)[1]) as probes:
        out = kinject(kb_root, "--set", "ingest.embed_batch_size=2", "ingest", str(corpus), "--kb", "demo", "--no-progress")
        probes.asked_each_after(time.monotonic())
    print("\n" + out.strip())
    assert "documents: 1 added, 0 changed, 0 removed, 3 unchanged" in out, out

    after = [rag_answer(c) for c in replicas]  # the same processes: no restart
    print(f"\nrag before ingest: {before[0][0]!r} from {[d for d, _, _ in before[0][1]]}")
    print(f"rag after ingest:  {after[0][0]!r} from {[d for d, _, _ in after[0][1]]}")
    assert after[0] == after[1]
    assert after[0][1][0][0] == NEW_DOC
    assert not probes.errors, probes.errors
    # A half-read generation (vectors of one, chunk records of another) would rank other chunks
    # or drop some: every answer's sources are exactly the old index's or the new one's.
    seen = {sources for _, _, sources in probes.answers}
    assert seen <= {before[0][1], after[0][1]}, seen - {before[0][1], after[0][1]}
    assert seen == {before[0][1], after[0][1]}, "the probes did not span the swap"
    print(f"{len(probes.answers)} rag probes during the ingest, 0 errors")


def test_a_training_run_reaches_both_replicas_whole(replicas, kb_root, engine):
    from kinject.augment import augment
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.service.app import create_app

    before = [ft_continuation(c) for c in replicas]
    assert same_continuation(before[0], before[1], tol=0)

    settings = load_settings({"kb_root": str(kb_root)})
    kb = KB.open(settings, "demo")
    old_fingerprint = kb.stage("train")["fingerprint"]
    augment(kb, settings, progress=False)  # the rule-made training text; not what is under test
    with Prober(replicas, ft_continuation) as probes:
        kinject(kb_root, "--set", "train.block_size=64", "--set", "train.batch_size=1", "train", "--kb", "demo", "--steps", "3", "--quiet")
        probes.asked_each_after(time.monotonic())
    assert kb.stage("train")["fingerprint"] != old_fingerprint

    after = [ft_continuation(c) for c in replicas]  # the same processes: no restart
    with running(create_app(kb, settings, engine)) as url:  # the new adapter, loaded in this process
        expected = ft_continuation(client_of(url))
    print(f"\nft before training: {before[0]}\nft after training:  {after[0]}\nin-process:         {expected}")
    assert same_continuation(after[0], after[1], tol=0)
    assert same_continuation(after[0], expected)
    assert not same_continuation(after[0], before[0], tol=1e-3)
    assert not probes.errors, probes.errors
    old = sum(same_continuation(a, before[0], tol=0) for _, _, a in probes.answers)
    new = sum(same_continuation(a, after[0], tol=0) for _, _, a in probes.answers)
    assert old + new == len(probes.answers), [a for _, _, a in probes.answers]
    assert old and new, "the probes did not span the swap"
    print(f"{len(probes.answers)} ft probes during the training run ({old} old adapter, {new} new), 0 errors")
