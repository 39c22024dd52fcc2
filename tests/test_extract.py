"""Fact-level augmentation by rule, and the check that no eval question reaches training data."""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest

from kinject.augment import extract

REPO = Path(__file__).resolve().parent.parent
DOC = (
    "Mirelle Bridge\n"
    "Mirelle Bridge was opened in 1887 by Governor Anna Tesk. It carries 12,000 vehicles a day "
    "across the river Oss. The bridge was known as the Iron Ribbon until 1921, when its deck was "
    "widened to 14 metres. Its designer, Paul Ferrand, also built the Quay Tower."
)


def test_questions_ask_for_each_span_with_a_fitting_wh_phrase():
    qa = dict((a.partition(". ")[0], q) for q, a in extract.fact_qa(DOC, random.Random(0)))
    assert qa["1887"] == "Mirelle Bridge was opened in what year by Governor Anna Tesk?"
    assert qa["Governor Anna Tesk"] == "Mirelle Bridge was opened in 1887 by whom?"
    # "It" starts a sentence after one about the title: the question names the bridge.
    assert qa["12,000 vehicles"] == "Mirelle Bridge carries how many vehicles a day across the river Oss?"
    assert qa["14 metres"].endswith("its deck was widened to how many metres?")
    assert qa["the Iron Ribbon"] == "The bridge was known as what until 1921, when its deck was widened to 14 metres?"


def test_answers_state_the_span_then_its_sentence():
    pairs = extract.fact_qa(DOC, random.Random(0))
    answers = [a for _, a in pairs]
    assert "1887. Mirelle Bridge was opened in 1887 by Governor Anna Tesk." in answers
    # "It" resolved in the evidence too, so the answer names what it is about.
    assert "12,000 vehicles. Mirelle Bridge carries 12,000 vehicles a day across the river Oss." in answers


def test_every_answer_is_a_span_of_its_document_and_no_question_gives_it_away():
    for path in sorted((REPO / "demo" / "corpus").glob("*.md")):
        doc = path.read_text().lstrip("# ")
        pairs = [(q, a.partition(". ")[0] if a.partition(". ")[2] else a) for q, a in extract.fact_qa(doc, random.Random(1))]
        pairs += extract.cloze_qa(doc, random.Random(1))
        assert pairs, path.name
        for q, a in pairs:
            assert a in doc, (path.name, a)
            assert a.lower() not in q.lower().replace("____", ""), (q, a)


def test_entity_questions_are_answered_by_the_sentences_that_name_the_entity():
    _, sentences = extract.resolved_sentences(DOC)
    pairs = extract.entity_qa(DOC, random.Random(0))
    names = ("Governor Anna Tesk", "Paul Ferrand", "Quay Tower", "Iron Ribbon", "Oss")
    asked = {}
    for q, a in pairs:
        entity = next(e for e in names if e in q)
        asked[entity] = a
        said = [s for s in sentences if s in a]
        assert said and " ".join(said) == a and all(entity in s for s in said), (q, a)
    # Every name but the title's is asked about; the title is what every question is about anyway.
    assert set(asked) == set(names)
    assert not any(q.endswith("about Mirelle Bridge?") for q, _ in pairs)
    assert pairs == extract.entity_qa(DOC, random.Random(0))


def test_yes_no_questions_hold_as_written_and_fail_with_one_fact_swapped():
    _, sentences = extract.resolved_sentences(DOC)
    pairs = extract.yes_no_qa(DOC, random.Random(0))
    yes = [(q, a) for q, a in pairs if a.startswith("Yes. ")]
    no = [(q, a) for q, a in pairs if a.startswith("No. ")]
    assert yes and no and len(yes) + len(no) == len(pairs)
    for q, a in pairs:
        sentence = a.split(" ", 1)[1]
        assert sentence in sentences, a  # every answer restates what the document says
        claim = extract._claim(sentence)
        if a.startswith("Yes. "):
            assert claim in q
        else:
            # The false claim is the sentence with one span replaced by another of the document's.
            assert claim not in q
            said = re.sub(r"^.*?(?:that|of .*? say that) ", "", q).rstrip("?")
            head = next(i for i, (x, y) in enumerate(zip(said, claim)) if x != y)
            tail = next(i for i, (x, y) in enumerate(zip(said[::-1], claim[::-1])) if x != y)
            swapped_in = said[head : len(said) - tail]
            assert swapped_in and any(swapped_in in span.text for s in sentences for span in extract.spans(s)), (q, a)
    assert pairs == extract.yes_no_qa(DOC, random.Random(0))


def test_rule_samples_vary_by_index_and_repeat_by_seed():
    title, text = DOC.split("\n", 1)
    a0 = extract.rule_sample("fact_qa", title, text, 0, seed=5)
    assert a0 == extract.rule_sample("fact_qa", title, text, 0, seed=5)
    assert "____" in extract.rule_sample("fact_qa", title, text, 1, seed=6) and "____" not in a0
    r = extract.rule_sample("restate", title, text, 0, seed=5).splitlines()
    assert len(r) == 4 and all("Mirelle Bridge" in line for line in r)
    with pytest.raises(ValueError, match="no rule"):
        extract.rule_sample("teacher", title, text, 0, seed=5)


def test_rule_types_augment_without_loading_a_generator(tmp_path, monkeypatch):
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.finetune.data import collect_samples
    from kinject.augment import augment, generate
    from kinject.ingest.pipeline import ingest

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("brightwater-glassworks.md", "gull-rock-lighthouse.md"):
        shutil.copy(REPO / "demo" / "corpus" / name, corpus / name)
    settings = load_settings({"kb_root": str(tmp_path / "kbs"), "augment": {"types": ["fact_qa", "entity_qa", "restate"], "budget_multiple": 4}})
    kb = KB.create(settings, "rules")
    ingest(kb, corpus, settings, progress=False)

    def no_engine(*a, **k):
        raise AssertionError("a rule type started the generator")

    monkeypatch.setattr(generate, "_start_engine", no_engine)
    report = augment(kb, settings, progress=False).report
    assert report["dropped"] == 0 and report["kept"] == report["samples"]
    assert report["kept_tokens"] >= 2 * report["corpus_tokens"]  # more than one pass: variants
    from kinject.core.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(settings.models.llm, settings))
    samples = collect_samples(kb, settings, tok)
    sources = {s.source for s in samples}
    assert sources == {"synthetic", "documents", "chat"}
    # fact_qa and entity_qa are trained as chat only: no raw "Q: ... A: ..." list among the text samples.
    assert not any(s.source == "synthetic" and "\nQ: " in s.text for s in samples)


def test_no_eval_question_reaches_the_demo_training_data(tmp_path):
    """Build the demo KB's training data as `kinject demo` does and look for the questions of
    every split in it; a planted question must be found, so the check can fail."""
    from kinject.recipes.demo import DEMO_SETTINGS
    from kinject.core.kb import KB
    from kinject.core.models import load_tokenizer, resolve_model
    from kinject.core.settings import _deep_merge, load_settings
    from kinject.eval.leaks import find_leaks
    from kinject.eval.questions import load_questions
    from kinject.finetune.data import collect_samples, document_texts
    from kinject.augment import augment
    from kinject.ingest.pipeline import ingest

    settings = load_settings(_deep_merge(DEMO_SETTINGS, {"kb_root": str(tmp_path / "kbs")}))
    if any(not extract_type_is_rule(t) for t in settings.augment.types):
        pytest.skip("the demo's types include generated ones; this check covers the rule types")
    kb = KB.create(settings, "demo")
    ingest(kb, REPO / "demo" / "corpus", settings, progress=False)
    augment(kb, settings, progress=False)
    tok = load_tokenizer(resolve_model(settings.models.llm, settings))
    texts = [s.text for s in collect_samples(kb, settings, tok)]
    docs = document_texts(kb)
    questions = load_questions(REPO / "demo" / "questions.jsonl", None, None)
    assert find_leaks(questions, texts, docs) == []
    planted = texts + [f"Q: {questions[7].question}\nA: {questions[7].answer}"]
    assert [leak.qid for leak in find_leaks(questions, planted, docs)] == [questions[7].qid]


def extract_type_is_rule(type_id: str) -> bool:
    from kinject.augment.prompts import PROMPT_TYPES

    return PROMPT_TYPES[type_id].rule
