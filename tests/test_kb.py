import json
import multiprocessing as mp

import pytest

from core.kb import KB, KBError, KBLockedError


def test_create_open_list_and_manifest_roundtrip(settings):
    kb = KB.create(settings, "alpha")
    assert KB.open(settings, "alpha").root == kb.root
    m = kb.manifest()
    assert m["schema_version"] == 1 and m["name"] == "alpha" and m["stages"] == {}
    kb.record_stage("ingest", fingerprint="f1", outputs={"chunks": 3}, metrics={"docs": 1})
    again = KB.open(settings, "alpha").stage("ingest")
    assert again["fingerprint"] == "f1" and again["outputs"] == {"chunks": 3} and again["status"] == "done"
    assert [k.name for k in KB.list(settings)] == ["alpha"]
    with pytest.raises(KBError, match="already exists"):
        KB.create(settings, "alpha")


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../x", "/abs", "a\\b", ".hidden", "x" * 65])
def test_names_cannot_escape(settings, bad):
    with pytest.raises(KBError, match="invalid KB name"):
        KB.create(settings, bad)


def test_open_missing_kb_says_how_to_create(settings):
    with pytest.raises(KBError, match="kinject kb create nope"):
        KB.open(settings, "nope")


def test_interrupted_manifest_write_leaves_the_old_one(settings, monkeypatch):
    kb = KB.create(settings, "beta")
    kb.record_stage("ingest", fingerprint="old")
    before = kb.manifest_path.read_text()

    import core.files

    real_replace = core.files.os.replace

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(core.files.os, "replace", boom)
    with pytest.raises(OSError):
        kb.record_stage("ingest", fingerprint="new")
    monkeypatch.setattr(core.files.os, "replace", real_replace)
    assert kb.manifest_path.read_text() == before
    assert json.loads(before)["stages"]["ingest"]["fingerprint"] == "old"
    assert not [p for p in kb.root.iterdir() if p.name.endswith(".tmp")]


def test_stale_stage_is_flagged(settings):
    kb = KB.create(settings, "gamma")
    kb.record_stage("augment", fingerprint="syn1")
    kb.record_stage("train", fingerprint="ad1", inputs={"augment": "syn1"})
    assert kb.stale() == {}
    kb.record_stage("augment", fingerprint="syn2")
    assert kb.stale() == {"train": ["augment"]}


def _hold_lock(root, ready, release):
    from core.kb import KB

    with KB(root).lock():
        ready.set()
        release.wait(30)


def test_second_process_fails_fast_with_holder_pid(settings):
    kb = KB.create(settings, "delta")
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(kb.root, ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(KBLockedError, match=f"locked by pid {p.pid}"):
            with kb.lock():
                pass
    finally:
        release.set()
        p.join()
    with kb.lock():  # released when the holder ends
        with kb.lock():  # and re-entrant within a process
            pass


def test_lock_of_a_killed_holder_is_recovered(settings):
    kb = KB.create(settings, "eps")
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(kb.root, ready, release))
    p.start()
    assert ready.wait(30)
    p.kill()
    p.join()
    with kb.lock():
        pass


def test_inside_refuses_escape(settings):
    kb = KB.create(settings, "zeta")
    assert kb.inside("eval/x.json") == (kb.root / "eval/x.json").resolve()
    for bad in ("../other", "/etc/passwd", "eval/../../x"):
        with pytest.raises(KBError, match="escapes"):
            kb.inside(bad)
