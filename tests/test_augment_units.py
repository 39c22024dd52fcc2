"""Augmentation parts that need no model: the planner, curation filters, report metrics."""
from __future__ import annotations

from collections import Counter

import pytest

from kinject.core.settings import AugmentSettings
from kinject.augment.curate import SourceIndex, check_sample, copy_overlap, curate, mentions, trim_to_sentence
from kinject.augment.plan import Planner, sample_seed
from kinject.augment.prompts import DEFAULT_TYPES, PROMPT_TYPES
from kinject.augment.report import distinct_n, gzip_ratio
from kinject.ingest.readers import Document


def _lengths(p):
    # A fixed, uneven length per key, as an engine's outputs would be.
    return 20 + (sample_seed(0, p.doc_id, p.type, p.sample_index) % 40)


def _run(planner: Planner) -> list:
    chunks = []
    while chunk := planner.next_chunk():
        chunks.append(chunk)
        for p in chunk:
            planner.record(p, _lengths(p))
    return chunks


def test_plan_meets_budget_with_small_overshoot_and_follows_weights():
    docs = [f"d{i}" for i in range(5)]
    planner = Planner(docs, {"key_concepts": 2.0, "mind_map": 1.0, "teacher": 1.0}, budget=6000, chunk_size=8, first_guess_tokens=64)
    chunks = _run(planner)
    assert 6000 <= planner.total < 6000 + 8 * 60
    assert len(chunks[-1]) < 8  # the last chunk is sized to what the budget still needs
    samples = [p for c in chunks for p in c]
    keys = [p.key for p in samples]
    assert len(keys) == len(set(keys))
    by_type = Counter()
    by_doc = Counter()
    for p in samples:
        by_type[p.type] += _lengths(p)
        by_doc[p.doc_id] += _lengths(p)
    assert by_type["key_concepts"] / by_type["mind_map"] == pytest.approx(2.0, rel=0.1)
    assert by_type["teacher"] / by_type["mind_map"] == pytest.approx(1.0, rel=0.1)
    assert max(by_doc.values()) / min(by_doc.values()) < 1.15
    for cell in {(p.doc_id, p.type) for p in samples}:  # sample indices run 0..n-1 in every cell
        idx = sorted(p.sample_index for p in samples if (p.doc_id, p.type) == cell)
        assert idx == list(range(len(idx)))


def test_plan_is_reproducible_and_seeds_depend_only_on_the_key():
    a = _run(Planner(["x", "y"], dict.fromkeys(DEFAULT_TYPES, 1.0), 2000, 6, 48, seed=3))
    b = _run(Planner(["x", "y"], dict.fromkeys(DEFAULT_TYPES, 1.0), 2000, 6, 48, seed=3))
    assert a == b
    c = _run(Planner(["x", "y"], dict.fromkeys(DEFAULT_TYPES, 1.0), 2000, 6, 48, seed=4))
    assert [p.key for ch in a for p in ch][:10] == [p.key for ch in c for p in ch][:10]
    assert [p.seed for ch in a for p in ch] != [p.seed for ch in c for p in ch]
    # A larger budget replays the same first chunks, then goes on.
    big = _run(Planner(["x", "y"], dict.fromkeys(DEFAULT_TYPES, 1.0), 4000, 6, 48, seed=3))
    assert big[: len(a) - 1] == a[:-1]
    assert {p.key for ch in a for p in ch} <= {p.key for ch in big for p in ch}


def test_the_seven_spa_types_are_default_and_qa_is_selectable():
    assert DEFAULT_TYPES == ["key_concepts", "mind_map", "implications", "critical_qa", "case_study", "discussion", "teacher"]
    assert AugmentSettings().types == DEFAULT_TYPES
    qa = PROMPT_TYPES["qa"]
    assert not qa.default
    msgs = qa.chat("Oil", "Iran exported oil in 1973.")
    assert msgs[0]["role"] == "system" and "Iran exported oil in 1973." in msgs[1]["content"]
    assert qa.completion("Oil", "Iran exported oil in 1973.").startswith("Title: Oil\n\nIran exported oil in 1973.")
    assert qa.prompt_id("chat") != qa.prompt_id("completion")


# ---- curation on crafted samples -------------------------------------------------------------
SOURCE = Document(
    doc_id="oil",
    title="1973 oil crisis",
    text=(
        "On October 6, 1973, Syria and Egypt launched a surprise attack on Israel. At the time, Iran was the "
        "world's second-largest oil exporter and a close US ally. The Shah of Iran said the price of wheat had "
        "risen by 300 percent."
    ),
    source="test",
)
CFG = AugmentSettings(min_tokens=5, copy_overlap_max=0.5, faithfulness_min=0.5, near_dup_threshold=0.7)
GOOD = "The attack by Syria and Egypt on Israel in 1973 raised oil prices, because Iran sold oil to the US."


def _sample(text, tokens=None, finish="stop", i=0, **extra):
    return {
        "doc_id": "oil", "type": "key_concepts", "sample_index": i, "prompt_id": "p", "seed": 1, "generator": "g",
        "text": text, "tokens": len(text.split()) if tokens is None else tokens, "finish_reason": finish, **extra,
    }


@pytest.mark.parametrize(
    "sample, reason",
    [
        (_sample("   ", tokens=0), "empty"),
        (_sample("Syria attacked.", tokens=3), "too_short"),
        (_sample("Syria and Egypt attacked Israel in 1973 and then the", finish="length", trimmed_text="", trimmed_tokens=0), "truncated"),
        (_sample("I'm sorry, but I cannot help with that request about Iran in 1973."), "refusal"),
        (_sample("Syria and Egypt launched a surprise attack on Israel. At the time, Iran was the world's second-largest oil exporter."), "copy"),
        (_sample("The document explains many things about how people think and what they do every day."), "ungrounded"),
        (_sample("The document about the 1973 oil crisis can be broken down into several key concepts."), "ungrounded"),
        (_sample("In 1981 Saudi Arabia and Venezuela, led by President Carter, cut output by 45 percent for Iran."), "unfaithful"),
        (_sample(GOOD), None),
    ],
)
def test_each_curation_rule(sample, reason):
    assert check_sample(sample, SourceIndex.of(SOURCE.title, SOURCE.text), CFG).reason == reason


def test_a_cut_off_output_keeps_its_whole_sentences():
    text = "Syria and Egypt attacked Israel in 1973. Iran was a US ally.\n2. The Shah said"
    assert trim_to_sentence(text) == "Syria and Egypt attacked Israel in 1973. Iran was a US ally."
    s = _sample(text, finish="length", trimmed_text=trim_to_sentence(text), trimmed_tokens=14)
    v = check_sample(s, SourceIndex.of(SOURCE.title, SOURCE.text), CFG)
    assert v.reason is None and v.text.endswith("US ally.") and v.tokens == 14


def test_mentions_skip_list_numbers_and_sentence_starts():
    numbers, entities = mentions("Key facts:\n1. Iran sold oil in 1973.\nStep 2: the Shah of Iran spoke. Then OPEC met.")
    assert numbers == {"1973"}
    assert entities == {"shah", "iran", "opec"}  # "Iran" opens line 1 but recurs mid-sentence


def test_copy_overlap_measures_verbatim_ngrams():
    src = SourceIndex.of(SOURCE.title, SOURCE.text)
    assert copy_overlap(SOURCE.text, src) == 1.0
    assert copy_overlap(GOOD, src) == 0.0


def test_duplicates_are_dropped_with_reason_and_kept_in_the_side_list():
    near = GOOD.replace("raised oil prices", "raised the oil prices")
    samples = [_sample(GOOD, i=0), _sample(GOOD.replace(" ", "  ") + "\n", i=1), _sample(near, i=2), _sample("Refused.", tokens=1, i=3)]
    out = curate(samples, {"oil": SOURCE}, CFG)
    assert [r["sample_index"] for r in out.kept] == [0]
    reasons = {r["sample_index"]: r["reason"] for r in out.dropped}
    assert reasons == {1: "duplicate", 2: "near_duplicate", 3: "too_short"}
    assert out.counts["duplicate"] == out.counts["near_duplicate"] == out.counts["too_short"] == 1
    assert out.kept[0]["train_text"] == f"1973 oil crisis\n{GOOD}"
    assert [d["detail"].get("of") for d in out.dropped if d["reason"] != "too_short"] == [["oil", "key_concepts", 0]] * 2


def test_report_metrics_on_known_text():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == round(2 / 3, 4)
    assert gzip_ratio(["abc " * 500]) > 20 > gzip_ratio(["The quick brown fox jumps over the lazy dog."]) > 0


def test_a_small_budget_spreads_over_documents_and_types_first():
    docs = [f"d{i}" for i in range(5)]
    chunk = Planner(docs, dict.fromkeys(DEFAULT_TYPES, 1.0), budget=7 * 48, chunk_size=16, first_guess_tokens=48).next_chunk()
    assert len(chunk) == 7
    assert {p.type for p in chunk} == set(DEFAULT_TYPES) and {p.doc_id for p in chunk} == set(docs)
    every_cell = Planner(docs, dict.fromkeys(DEFAULT_TYPES, 1.0), budget=35 * 48, chunk_size=64, first_guess_tokens=48).next_chunk()
    assert len({(p.doc_id, p.type) for p in every_cell}) == 35  # each cell once before any twice
