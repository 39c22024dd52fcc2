"""The influence estimator on a tiny KB: the bundled 135M model, real LoRA gradients, seeded."""
from __future__ import annotations

import random

import pytest

from kinject.core.index import Document
from kinject.core.influence import (
    CountSketch,
    InfluenceError,
    InfluenceEstimator,
    corpus_targets,
    read_target_questions,
    score_records,
    select_top,
)
from kinject.core.settings import SettingsError, load_settings

DOCS = [
    Document("lighthouse", "Gull Rock Lighthouse", (
        "Gull Rock Lighthouse was lit for the first time in 1688 by keeper Orsa Penhallow. "
        "Its lamp burned whale oil until 1841, when the Harbour Wardens fitted a lens made in Brightwater. "
        "The tower is 31 metres tall and stands on the northern cliff of Tessel Vaar."
    ), "lighthouse.md"),
    Document("glassworks", "Brightwater Glassworks", (
        "The Brightwater Glassworks was founded in 1563 by the glassmaker Ilse Marrow. "
        "Its furnaces burned peat from the Dunmere bogs and employed 140 workers by 1700. "
        "The works made the green bottles that Vaskarra still calls marrow glass."
    ), "glassworks.md"),
]
FACT = "Gull Rock Lighthouse was lit for the first time in 1688 by keeper Orsa Penhallow, and its tower is 31 metres tall."


def shuffled(text: str, seed: int) -> str:
    ws = text.split()
    random.Random(seed).shuffle(ws)
    return " ".join(ws)


@pytest.fixture(scope="module")
def estimator():
    # Small on purpose (short cut, two warm-up steps, four target items): the ranking must already
    # hold there, and the test stays a few seconds long.
    s = load_settings({"influence": {"dims": 2048, "warmup_steps": 2, "target_items": 4, "max_tokens": 64}})
    return InfluenceEstimator(s, DOCS, corpus_targets(DOCS, 4, s.seed))


def test_a_corpus_fact_outranks_its_shuffled_words(estimator):
    fact = estimator.score_text(f"Gull Rock Lighthouse\n{FACT}")
    copies = [estimator.score_text(f"Gull Rock Lighthouse\n{shuffled(FACT, seed)}") for seed in range(3)]
    assert fact > max(copies), (fact, copies)


def test_corpus_targets_are_cloze_items_answered_in_their_document():
    items = corpus_targets(DOCS, 4, seed=0)
    assert len(items) == 4
    assert {i.source for i in items} == {"corpus"}
    for item in items:
        assert "___" in item.question
        doc = next(d for d in DOCS if f'"{d.title}"' in item.question)
        assert item.question.split(": ", 1)[1].replace("___", item.answer) in doc.text
    assert corpus_targets(DOCS, 4, seed=0) == items  # seeded


def test_count_sketch_keeps_inner_products():
    import torch

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    b = a + 0.5 * b
    sk = CountSketch(200_000, 8192, seed=0)
    cos = lambda x, y: float(x @ y / x.norm() / y.norm())  # noqa: E731
    assert abs(cos(sk(a), sk(b)) - cos(a, b)) < 0.03


def test_selection_keeps_the_top_share_of_each_document():
    records = [{"doc_id": d} for d in "aaaabb"]
    assert select_top(records, [0.1, 0.4, 0.3, 0.2, -1.0, -2.0], 0.5) == [False, True, True, False, True, False]
    assert select_top(records, [0.0] * 6, 0.1) == [True, False, False, False, True, False]  # one per document at least


def test_bad_target_questions_and_share_are_refused_by_name(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"question": "Who lit it?"}\n')
    with pytest.raises(InfluenceError, match="line 1: a target question needs"):
        read_target_questions(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InfluenceError, match="cannot read the target questions file"):
        read_target_questions(bad)
    with pytest.raises(SettingsError, match=r"influence.share must be in \(0, 1\]"):
        load_settings({"influence": {"share": 1.5}})
    with pytest.raises(SettingsError, match="target questions file not found"):
        load_settings({"influence": {"target_questions": str(tmp_path / "missing.jsonl")}})


def test_scores_are_cached_per_sample_and_a_rerun_scores_only_what_is_missing(estimator, tmp_path):
    records = [
        {"doc_id": "lighthouse", "type": "restate", "sample_index": i, "train_text": f"Gull Rock Lighthouse\n{t}"}
        for i, t in enumerate([FACT, shuffled(FACT, 0)])
    ]
    cache = tmp_path / "influence.jsonl"
    s = estimator.settings
    first, _ = score_records(records[:1], s, DOCS, cache, progress=False, estimator=estimator)
    assert first.new == 1
    again, est = score_records(records, s, DOCS, cache, progress=False, estimator=None)
    # only the new record was scored; the cached one was not recomputed, and no model was needed for it
    assert (again.new, again.cached) == (1, 1)
    assert again.scores[0] == first.scores[0]
    done, est2 = score_records(records, s, DOCS, cache, progress=False)
    assert (done.new, est2) == (0, None)  # nothing missing: the model is never loaded
    assert done.scores == again.scores


def test_the_bandit_moves_weight_to_the_arm_whose_samples_teach_most():
    from kinject.augment.run import arm_rewards, bandit_weights

    samples = [{"type": t} for t in ["a", "a", "b", "b", "c"]]
    kept = [{"type": "a", "influence": 0.20}, {"type": "a", "influence": 0.10}, {"type": "b", "influence": 0.02}]
    reward = arm_rewards(samples, kept, ["a", "b", "c", "d"])
    assert reward == {"a": 0.15, "b": 0.01, "c": 0.0, "d": None}  # c's one sample was dropped; d made none
    w = bandit_weights({"a": 1, "b": 1, "c": 1, "d": 1}, reward, explore=0.2, temperature=0.05)
    assert w["a"] == w["d"] > w["b"] > w["c"] >= 0.2 / 4  # an untried arm is tried; none starves
    assert abs(sum(w.values()) - 1) < 1e-4


def test_the_eval_refuses_the_target_questions(tmp_path):
    from kinject.core.kb import KB
    from kinject.eval.questions import Question
    from kinject.eval.run import EvalError, _not_influence_targets

    kb = KB.create(load_settings({"kb_root": str(tmp_path / "kbs")}), "t")
    questions = [Question("q1", "When was Gull Rock Lighthouse first lit?", "1688"), Question("q2", "Who founded the glassworks?", "Ilse Marrow")]
    assert _not_influence_targets(kb, questions, {}) == (questions, {})
    (kb.root / "synthetic").mkdir(exist_ok=True)
    (kb.root / "synthetic" / "influence_targets.jsonl").write_text('{"question": "when was gull rock lighthouse first lit", "answer": "1688"}\n')
    kept, skipped = _not_influence_targets(kb, questions, {})
    assert [q.qid for q in kept] == ["q2"] and skipped["influence_target"]["qids"] == ["q1"]
    with pytest.raises(EvalError, match="refuses to score"):
        _not_influence_targets(kb, questions[:1], {})


@pytest.mark.slow
def test_augment_and_train_score_select_and_guide_by_influence(tmp_path, monkeypatch):
    """Rule types on two demo documents: off leaves the records as they were; on records a score
    per kept sample and a per-type table; a rerun scores nothing again; train keeps each
    document's top share; the guided plan reports its rounds and moves weight to the best arm."""
    import json
    import shutil

    from kinject.augment import augment, generate
    from kinject.core.kb import KB
    from kinject.finetune.data import select_by_influence, synthetic_records
    from kinject.ingest.pipeline import ingest

    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("brightwater-glassworks.md", "gull-rock-lighthouse.md"):
        shutil.copy(repo / "demo" / "corpus" / name, corpus / name)
    small = {"dims": 1024, "warmup_steps": 2, "target_items": 4, "max_tokens": 48}
    base = {"kb_root": str(tmp_path / "kbs"), "augment": {"types": ["fact_qa", "restate"], "budget_multiple": 2}}
    off = load_settings(base)
    kb = KB.create(off, "inf")
    ingest(kb, corpus, off, progress=False)
    monkeypatch.setattr(generate, "_start_engine", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no generator for rule types")))

    report = augment(kb, off, progress=False).report
    assert "influence" not in report and not any("influence" in r for r in synthetic_records(kb))

    on = load_settings({**base, "influence": {**small, "enabled": True}})
    report = augment(kb, on, progress=False).report
    records = synthetic_records(kb)
    assert all(isinstance(r["influence"], float) for r in records)
    assert set(report["influence"]["per_type"]) == {"fact_qa", "restate"}
    assert report["influence"]["scored"] == len(records)
    again = augment(kb, on, progress=False).report["influence"]
    assert (again["scored"], again["cached"]) == (0, len(records))  # cached per sample

    half = load_settings({**base, "influence": {**small, "enabled": True, "share": 0.5}})
    kept, info = select_by_influence(kb, records, half)
    assert info["scored"] == 0  # augment's scores are reused
    for doc in {r["doc_id"] for r in records}:
        mine = [r for r in records if r["doc_id"] == doc]
        top = sorted(mine, key=lambda r: -r["influence"])[: round(len(mine) / 2)]
        assert [r for r in kept if r["doc_id"] == doc] == [r for r in mine if r in top]

    guided = load_settings({**base, "influence": {**small, "guide": True, "rounds": 2}})
    bandit = augment(kb, guided, progress=False).report["influence"]["bandit"]
    first = bandit["rounds"][0]
    assert first["weights"] == {"fact_qa": 0.5, "restate": 0.5}
    best = max(first["reward"], key=first["reward"].get)
    assert bandit["final_weights"][best] > 0.5
    json.dumps(bandit)  # the report stays plain JSON (no estimator left in it)
