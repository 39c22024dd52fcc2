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
