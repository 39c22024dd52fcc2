"""Fault injection: each long stage run by the real CLI in a child process, SIGKILLed early, in
the middle of a batch and in the middle of an atomic write, then rerun until it completes.

After every kill: the manifest is valid JSON and describes finished work only (a stage's record
matches what is on disk). At the end: nothing lost or duplicated (index chunk ids, synthetic
samples keyed by doc/type/index, training steps), and the index answers exactly as a
from-scratch build. The manifest is also read continually while the children run.

The exact kill points come from tests/crashpoint.py (the CLI with a SIGKILL at the N-th rename
onto a file, or halfway through the N-th append), in children forked from a server that has the
heavy libraries imported already; the early kills are plain SIGKILLs of a fresh interpreter after
a seeded random delay, so they land in its start-up. Two runs at once on one KB: the second fails
fast naming the holder's pid, and the lock a killed holder leaves behind does not block the next
run.

The three stages' sequences run side by side (`side_by_side`), each on KBs of its own, with every
child on one thread.

Tiny sizes: 3 demo documents, a 200-token augment budget, 6 training steps of 64-token blocks;
augment and train run on tests.conftest.small_llm (what they write, not how well, is tested here).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kinject.core.adapter_copy import FULL_MODEL_DIR
from kinject.core.settings import SPA_TYPES

from conftest import DEMO_DOCS as DOCS, REPO, copy_kb, small_llm
from crashpoint import forked

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RUN_TIMEOUT = 900  # one child, on a machine that may be very busy
INGEST = ["--set", "ingest.embed_batch_size=2", "ingest", "{corpus}", "--kb", "{kb}", "--no-progress"]
AUGMENT = ["--set", "models.llm={llm}", "--set", "augment.samples_per_call=3", "--set", f"augment.types={json.dumps(SPA_TYPES)}", "augment", "--kb", "{kb}", "--budget", "200", "--max-new-tokens", "32", "--no-progress"]
TRAIN = ["--set", "models.llm={llm}", "--set", "train.block_size=64", "--set", "train.batch_size=1", "--set", "train.save_every=2", "train", "--kb", "{kb}", "--steps", "6", "--quiet"]


# ---- running and killing the CLI ---------------------------------------------------------------
class Child:
    """`kinject ARGS` in a child process, output to a log file: forked from the preloaded server
    (tests/crashpoint.py), or with `fresh` a new interpreter running tests/crashpoint.py."""

    def __init__(self, kb_root: Path, args: list[str], crash: str | None = None, fresh: bool = False, **fmt):
        self.kb_root, self.log = kb_root, kb_root.parent / f"run-{time.monotonic_ns()}.log"
        env = {**os.environ, "KINJECT_KB_ROOT": str(kb_root), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("KINJECT_CRASH_AT", None)
        argv = [a.format(**fmt) for a in args]
        if fresh:
            if crash:
                env["KINJECT_CRASH_AT"] = crash
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "crashpoint.py"), *argv], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        else:
            self.proc = forked(argv, env, self.log, REPO, crash)
        self.pid = self.proc.pid
        self.manifest_reads = 0

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stopped(self) -> bool:
        """Stopped by SIGSTOP (state T in /proc/PID/stat)."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
        except FileNotFoundError:
            return False

    def wait(self, until=lambda child: False, timeout: float = RUN_TIMEOUT) -> int | None:
        """Wait for the child to exit (or for `until`), reading the manifest all the while."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and not until(self):
            assert time.monotonic() < deadline, f"child still running after {timeout} s:\n{self.output}"
            read_manifest_live(self.kb_root)
            self.manifest_reads += 1
            time.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def crash(kb_root: Path, args: list[str], at: str, **fmt) -> Child:
    """Run until the injected SIGKILL at `at`; the run must really die there."""
    child = Child(kb_root, args, crash=at, **fmt)
    rc = child.wait()
    assert rc == -signal.SIGKILL, f"expected a kill at {at}, got exit status {rc}:\n{child.output}"
    return child


def kill_early(kb_root: Path, args: list[str], seed: int, **fmt) -> Child:
    """SIGKILL a fresh interpreter after a seeded random delay: in its start-up."""
    delay = random.Random(seed).uniform(0.5, 3.0)
    started = time.monotonic()
    child = Child(kb_root, args, fresh=True, **fmt)
    assert child.wait(until=lambda c: time.monotonic() - started > delay) is None, f"finished within {delay:.1f} s:\n{child.output}"
    child.kill()
    return child


def finish(kb_root: Path, args: list[str], **fmt) -> Child:
    child = Child(kb_root, args, **fmt)
    rc = child.wait()
    assert rc == 0, child.output
    return child


# ---- the manifest -----------------------------------------------------------------------------
def read_manifest_live(kb_root: Path) -> None:
    """While a child runs: whenever a manifest exists, it parses and lists finished stages only."""
    for path in kb_root.glob("*/manifest.json"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        m = json.loads(data)  # never torn: it is only ever replaced whole
        assert all(rec["status"] == "done" for rec in m["stages"].values()), m["stages"]


def assert_finished_work_only(kb_dir: Path) -> dict:
    """With no child running: each stage record matches the files it names. Returns the stages."""
    from kinject.core.kb import KB
    from kinject.finetune.train import adapter_fingerprint
    from kinject.core.synthetic import training_corpus_hash

    stages = json.loads((kb_dir / "manifest.json").read_text())["stages"]
    assert all(rec["status"] == "done" for rec in stages.values())
    if "ingest" in stages:
        rec = stages["ingest"]
        meta = json.loads((kb_dir / rec["outputs"]["index"] / "meta.json").read_text())
        assert meta["fingerprint"] == rec["fingerprint"] and meta["chunks"] == rec["outputs"]["chunks"]
    if "augment" in stages:
        from kinject.core.files import read_jsonl

        curated = [r["train_text"] for r in read_jsonl(KB(kb_dir).dir("augment") / "curated.jsonl")]
        assert training_corpus_hash(curated) == stages["augment"]["fingerprint"], "the augment record does not describe synthetic/curated.jsonl"
    if "train" in stages:
        rec = stages["train"]
        assert adapter_fingerprint(kb_dir / "adapter", tuple(rec["outputs"]["files"])) == rec["fingerprint"]
    return stages


def temp_files(folder: Path, name: str) -> list[Path]:
    """Temp files of atomic writes of `name` left by a kill."""
    return sorted(folder.glob(f".{name}.*.tmp"))


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(demo_corpus) -> Path:
    return demo_corpus


@pytest.fixture(scope="module")
def scratch(demo_index, tmp_path_factory):
    """(kb, settings): the corpus ingested in-process, uninterrupted, with the CLI runs' settings
    (the session's demo index, copied)."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings

    settings = load_settings({"kb_root": str(tmp_path_factory.mktemp("scratch-kbs")), "ingest": {"embed_batch_size": 2}})
    copy_kb(demo_index, settings.kb_dir, "scratch")
    return KB.open(settings, "scratch"), settings


# ---- ingest -----------------------------------------------------------------------------------
def ingest_killed_anywhere(corpus, scratch, tmp_path):
    from kinject.core.kb import KB
    from kinject.core.retrieval import Retriever
    from kinject.core.settings import load_settings
    from kinject.core.index import load_state

    root = tmp_path / "kbs"
    kb_dir = root / "k"
    fmt = dict(corpus=corpus, kb="k")

    kill_early(root, INGEST, seed=1, **fmt)
    if (kb_dir / "manifest.json").exists():
        assert "ingest" not in assert_finished_work_only(kb_dir)

    # mid-batch: the second batch of vectors half-appended to the embedding checkpoint
    crash(root, INGEST, "torn:embedding-checkpoint.jsonl:2", **fmt)
    checkpoint = kb_dir / "index" / "embedding-checkpoint.jsonl"
    assert not checkpoint.read_bytes().endswith(b"\n") and not (kb_dir / "index" / "current.json").exists()
    assert "ingest" not in assert_finished_work_only(kb_dir)

    # the new index generation is complete, but not yet made current
    crash(root, INGEST, "replace:current.json:1", **fmt)
    assert temp_files(kb_dir / "index", "current.json") and (kb_dir / "index" / "g000001" / "faiss.index").exists()
    assert not (kb_dir / "index" / "current.json").exists() and "ingest" not in assert_finished_work_only(kb_dir)

    # the index is current, the manifest record is half-written
    crash(root, INGEST, "replace:manifest.json:1", **fmt)
    assert temp_files(kb_dir, "manifest.json") and (kb_dir / "index" / "current.json").exists()
    assert "ingest" not in assert_finished_work_only(kb_dir)

    done = finish(root, INGEST, **fmt)
    assert "0 added, 0 changed, 0 removed, 3 unchanged" in done.output and "chunks: 0 embedded" in done.output  # the killed runs' work is kept
    stages = assert_finished_work_only(kb_dir)
    ref_kb, ref_settings = scratch
    assert stages["ingest"]["fingerprint"] == ref_kb.stage("ingest")["fingerprint"]
    assert not checkpoint.exists()

    # chunk ids: none lost, none twice, each FAISS id exactly once
    state, ref = load_state(kb_dir / "index"), load_state(ref_kb.root / "index")
    chunk_ids = [rec["chunk_id"] for rec in state.chunks.values()]
    assert len(chunk_ids) == len(set(chunk_ids)) and set(chunk_ids) == {rec["chunk_id"] for rec in ref.chunks.values()}
    faiss_ids = state.index.ids().tolist()
    assert len(faiss_ids) == len(set(faiss_ids)) and set(faiss_ids) == set(state.chunks)

    # the index answers as the from-scratch one: same chunks, same order, same scores
    settings = load_settings({"kb_root": str(root), "ingest": {"embed_batch_size": 2}})
    questions = [json.loads(line)["question"] for line in (REPO / "demo" / "questions.jsonl").read_text().splitlines()]
    got = Retriever(KB.open(settings, "k"), settings).search_many(questions, 4)
    want = Retriever(ref_kb, ref_settings).search_many(questions, 4)
    for q, a, b in zip(questions, got, want):
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b], q
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5), q


# ---- augment ----------------------------------------------------------------------------------
def sample_lines(kb_dir: Path) -> list[dict]:
    from kinject.core.files import read_jsonl

    return read_jsonl(kb_dir / "synthetic" / "samples.jsonl")


def record_curated(kb_dir: Path, texts: list[str]) -> str:
    """Give the KB a finished augment stage whose curated corpus is `texts` (`title\\ntext`), as an
    earlier augment run with other settings would have left it. Returns its fingerprint."""
    from kinject.core.files import append_jsonl
    from kinject.core.kb import KB
    from kinject.core.synthetic import training_corpus_hash

    kb = KB(kb_dir)
    rows = [{"doc_id": DOCS[0], "type": "key_concepts", "text": t.split("\n", 1)[1], "train_text": t} for t in texts]
    append_jsonl(kb.dir("augment") / "curated.jsonl", rows)
    fingerprint = training_corpus_hash(texts)
    kb.record_stage("augment", fingerprint=fingerprint, inputs={"ingest": kb.stage("ingest")["fingerprint"]})
    return fingerprint


def augment_killed_anywhere(corpus, scratch, tmp_path):
    root = tmp_path / "kbs"
    kb_dir = copy_kb(scratch[0].root, root, "a")
    # An earlier run's finished work, which this run replaces.
    earlier = record_curated(kb_dir, ["Brightwater Glassworks\nAn earlier run wrote this sample about the glassworks in 1803."])
    samples = kb_dir / "synthetic" / "samples.jsonl"
    fmt = dict(kb="a", llm=small_llm())

    kill_early(root, AUGMENT, seed=2, **fmt)
    assert assert_finished_work_only(kb_dir)["augment"]["fingerprint"] == earlier

    # One run stops holding the lock, right after its first batch is appended...
    holder = Child(root, AUGMENT, crash="appended:samples.jsonl:1", **fmt)
    holder.wait(until=Child.stopped)
    assert holder.stopped(), holder.output
    # ...so a second run on the same KB fails at once, naming the holder.
    t0 = time.monotonic()
    second = Child(root, AUGMENT, **fmt)
    assert second.wait() == 2, second.output
    assert f"error: KB 'a' is locked by pid {holder.pid}" in second.output
    assert holder.stopped(), "the second run waited for the first instead of failing"
    print(f"\nthe second run failed in {time.monotonic() - t0:.1f} s (start-up included)")
    holder.kill()  # its lock file still names it: a stale lock
    assert (kb_dir / ".lock").read_text().strip() == str(holder.pid)
    kept = sample_lines(kb_dir)
    assert len(kept) == 3
    assert_finished_work_only(kb_dir)

    # mid-batch: the next batch half-appended
    crash(root, AUGMENT, "torn:samples.jsonl:1", **fmt)
    assert not samples.read_bytes().endswith(b"\n")
    assert sample_lines(kb_dir)[: len(kept)] == kept
    kept = sample_lines(kb_dir)  # the whole lines of the torn batch count too
    assert_finished_work_only(kb_dir)

    # Everything generated, curated.jsonl rewritten, report.json half-written: the earlier run's
    # record must not be left describing the new curated corpus.
    crash(root, AUGMENT, "replace:report.json:1", **fmt)
    assert temp_files(kb_dir / "synthetic", "report.json")
    assert_finished_work_only(kb_dir)

    done = finish(root, AUGMENT, **fmt)
    assert "nothing to generate" in done.output  # the killed runs' samples were all kept
    final = sample_lines(kb_dir)
    keys = [(s["doc_id"], s["type"], s["sample_index"]) for s in final]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    assert all(s in final for s in kept), "a sample written before a kill was lost or changed"
    report = json.loads((kb_dir / "synthetic" / "report.json").read_text())
    assert report["samples"] == len(final) and report["unused_samples"] == 0
    assert report["generated_tokens"] >= 200
    per_type: dict[tuple, list[int]] = {}
    for doc, kind, index in keys:
        per_type.setdefault((doc, kind), []).append(index)
    assert all(sorted(ix) == list(range(len(ix))) for ix in per_type.values()), per_type
    assert assert_finished_work_only(kb_dir)["augment"]["fingerprint"] != earlier


# ---- train ------------------------------------------------------------------------------------
def train_killed_anywhere(corpus, scratch, tmp_path):
    root = tmp_path / "kbs"
    kb_dir = copy_kb(scratch[0].root, root, "t")
    record_curated(kb_dir, [f"Brightwater\nLedger {i}: furnace {i % 4} of the Brightwater glassworks made {40 + i} green bottles in {1820 + i}." for i in range(24)])
    checkpoints = kb_dir / "adapter" / "checkpoints"
    fmt = dict(kb="t", llm=small_llm())

    kill_early(root, TRAIN, seed=3, **fmt)
    assert "train" not in assert_finished_work_only(kb_dir)

    # during a checkpoint write: step 4's folder is complete but not renamed into place
    crash(root, TRAIN, "replace:step-0000004:1", **fmt)
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step-0000002"]
    assert any(p.name.startswith(".step-0000004.") for p in checkpoints.iterdir())
    assert "train" not in assert_finished_work_only(kb_dir)

    # the adapter is trained and published; the manifest record is half-written
    crash(root, TRAIN, "replace:manifest.json:1", **fmt)
    # (the local preset trains every weight: the whole model is the published output)
    assert (kb_dir / "adapter" / FULL_MODEL_DIR / "model.safetensors").exists() and temp_files(kb_dir, "manifest.json")
    assert "train" not in assert_finished_work_only(kb_dir)

    done = finish(root, TRAIN, **fmt)
    assert "trained 6 steps (resumed from step 4)" in done.output
    stages = assert_finished_work_only(kb_dir)
    assert stages["train"]["metrics"]["steps"] == 6 and not checkpoints.exists()
    report = json.loads((kb_dir / "adapter" / "report.json").read_text())
    assert [step for step, _ in report["loss_curve"]] == [1, 2, 3, 4, 5, 6]  # each step once, none lost
    assert report["tokens_seen"] == 6 * 64 and report["resumed_from_step"] == 4
    assert "adapter is up to date" in finish(root, TRAIN, **fmt).output


# ---- the tests: the three sequences side by side -------------------------------------------------
SEQUENCES = {"ingest": ingest_killed_anywhere, "augment": augment_killed_anywhere, "train": train_killed_anywhere}


@pytest.fixture(scope="module")
def side_by_side(request, corpus, scratch, tmp_path_factory):
    """The kill sequence of each selected test below, all started at once in threads. They share
    nothing but the read-only fixtures, and each child runs on one thread (OMP_NUM_THREADS=1), so
    on two cores they take little longer together than the longest alone. Each test waits for
    its own sequence and re-raises what failed in it."""
    names = {item.name for item in request.session.items}
    wanted = [stage for stage in SEQUENCES if any(n.startswith(f"test_{stage}_killed_anywhere") for n in names)]
    pool = ThreadPoolExecutor(max(1, len(wanted)))
    runs = {stage: pool.submit(SEQUENCES[stage], corpus, scratch, tmp_path_factory.mktemp(f"{stage}-killed")) for stage in wanted}
    yield runs
    pool.shutdown(wait=True)


def test_ingest_killed_anywhere_ends_as_the_from_scratch_index(side_by_side):
    side_by_side["ingest"].result()


def test_augment_killed_anywhere_loses_and_repeats_no_sample_and_the_lock_holds(side_by_side):
    side_by_side["augment"].result()


def test_train_killed_anywhere_trains_each_step_once(side_by_side):
    side_by_side["train"].result()
