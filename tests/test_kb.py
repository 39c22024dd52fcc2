import json
import multiprocessing as mp
import os

import pytest

from kinject.core.kb import KB, KBError, KBLockedError


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

    import kinject.core.files

    real_replace = kinject.core.files.os.replace

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(kinject.core.files.os, "replace", boom)
    with pytest.raises(OSError):
        kb.record_stage("ingest", fingerprint="new")
    monkeypatch.setattr(kinject.core.files.os, "replace", real_replace)
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
    from kinject.core.kb import KB

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


def test_a_second_thread_is_refused_while_the_holder_re_enters(settings):
    import threading

    kb = KB.create(settings, "threads")
    holding, release, outcome = threading.Event(), threading.Event(), []

    def hold():
        with kb.lock():
            with kb.lock():  # the holding thread re-enters
                holding.set()
                release.wait(30)

    def intrude():
        try:
            with kb.lock():
                outcome.append("entered")
        except KBLockedError as e:
            outcome.append(str(e))

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        intruder = threading.Thread(target=intrude)
        intruder.start()
        intruder.join(30)
    finally:
        release.set()
        holder.join(30)
    assert outcome == [f"KB 'threads' is locked by another thread of this process (pid {os.getpid()})"]
    with kb.lock():  # free again once the holder left
        pass


def test_create_refuses_a_folder_that_is_not_a_kb_and_delete_removes_only_the_kb(settings):
    (settings.kb_dir / "photos").mkdir(parents=True)
    (settings.kb_dir / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(KBError, match="already exists and is not a KB"):
        KB.create(settings, "photos")
    with pytest.raises(KBError, match="already exists and is not a KB"):
        KB.open(settings, "photos", create=True)
    assert not (settings.kb_dir / "photos" / "manifest.json").exists()

    kb = KB.create(settings, "mixed")
    kb.dir("ingest")
    (kb.uploads).mkdir()
    (kb.uploads / "notes.md").write_text("# n")
    (kb.root / "mine.txt").write_text("not the KB's")  # put there by hand later
    assert kb.delete() == ["mine.txt"]
    assert sorted(p.name for p in kb.root.iterdir()) == ["mine.txt"]
    assert [k.name for k in KB.list(settings)] == []

    empty = KB.create(settings, "plain")
    assert empty.delete() == [] and not empty.root.exists()


def test_atomic_dir_replaces_a_folder_that_readers_always_find_whole(tmp_path):
    """A reader opening files by path below the folder never finds it missing or without a file
    while it is replaced (a reader that already holds the old folder open is not covered: it is
    deleted at once)."""
    import threading

    from kinject.core.files import atomic_dir

    target = tmp_path / "model"
    files = {"config.json", "weights.bin"}

    def write(version: int) -> None:
        with atomic_dir(target) as tmp:
            for name in files:
                (tmp / name).write_text(str(version))

    write(0)
    stop, seen, problems = threading.Event(), [0], []

    def read():  # as a model loader does: each file opened by its path below the folder
        while not stop.is_set():
            for name in sorted(files):
                try:
                    if not (target / name).read_text().isdigit():
                        problems.append(f"torn {name}")
                except FileNotFoundError as e:
                    problems.append(f"missing: {e}")
            seen[0] += 1

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(1, 300):
            write(version)
    finally:
        stop.set()
        reader.join(30)
    assert seen[0] > 0 and problems == [], problems[:3]
    assert (target / "config.json").read_text() == "299"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old folders are gone
