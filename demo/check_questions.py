"""Sanity check for the Vaskarra demo corpus and questions (stdlib only).

Run from anywhere:  python3 demo/check_questions.py
"""
import collections
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
QFILE = os.path.join(HERE, "questions.jsonl")


def doc_text(name):
    with open(os.path.join(CORPUS, name), encoding="utf-8") as f:
        t = f.read()
    if name.endswith(".html"):
        t = re.sub(r"<(script|style)\b.*?</\1>", " ", t, flags=re.S | re.I)
        t = re.sub(r"<[^>]+>", " ", t)
    return re.sub(r"\s+", " ", t)


errors = []
docs = sorted(os.listdir(CORPUS))
texts = {d: doc_text(d) for d in docs}
words = {d: len(texts[d].split()) for d in docs}
for d in docs:
    if not re.fullmatch(r"[a-z0-9-]+\.(md|txt|html)", d):
        errors.append(f"bad file name {d}")
    if not 120 <= words[d] <= 250:
        errors.append(f"{d}: {words[d]} words (want 120-250)")

kinds, splits = collections.Counter(), collections.Counter()
kind_split, idx_count = collections.Counter(), collections.Counter()
doc_splits = collections.defaultdict(set)
hops = collections.Counter()
qids = set()
with open(QFILE, encoding="utf-8") as f:
    for ln, line in enumerate(f, 1):
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {ln}: does not parse: {e}")
            continue
        qid = q.get("qid")
        if qid in qids:
            errors.append(f"{qid}: duplicate qid")
        qids.add(qid)
        for k in ("qid", "question", "answer", "doc_ids", "split"):
            if k not in q:
                errors.append(f"line {ln}: missing {k}")
        if q.get("split") not in ("dev", "test"):
            errors.append(f"{qid}: bad split {q.get('split')}")
        missing = [d for d in q["doc_ids"] if d not in texts]
        if missing:
            errors.append(f"{qid}: doc_ids not found: {missing}")
            continue
        joined = " ".join(texts[d] for d in q["doc_ids"]).lower()
        if "choices" in q:
            kind = "mc"
            ch, i = q["choices"], q.get("answer_index")
            if len(ch) != 4 or len(set(ch)) != 4:
                errors.append(f"{qid}: need 4 distinct choices")
            if not isinstance(i, int) or not 0 <= i < len(ch):
                errors.append(f"{qid}: bad answer_index {i}")
            elif ch[i] != q["answer"]:
                errors.append(f"{qid}: answer != choices[answer_index]")
            else:
                idx_count[i] += 1
            if q["answer"].lower() not in joined:
                errors.append(f"{qid}: MC answer text not found in its docs")
        else:
            kind = "short"
            if q["answer"].lower() not in joined:
                errors.append(f"{qid}: answer {q['answer']!r} not verbatim in {q['doc_ids']}")
            if len(q["answer"].split()) > 5:
                errors.append(f"{qid}: short answer longer than 5 words")
        kinds[kind] += 1
        splits[q["split"]] += 1
        kind_split[(kind, q["split"])] += 1
        hops[len(q["doc_ids"])] += 1
        for d in q["doc_ids"]:
            doc_splits[d].add(q["split"])

for d in docs:
    if doc_splits.get(d) != {"dev", "test"}:
        errors.append(f"{d}: questions only in splits {sorted(doc_splits.get(d, []))}")

ext = collections.Counter(os.path.splitext(d)[1] for d in docs)
print(f"documents: {len(docs)} {dict(ext)}; words min/max {min(words.values())}/{max(words.values())}")
print(f"questions: {sum(kinds.values())} {dict(kinds)}; splits {dict(splits)}")
print("kind x split:", {f"{k}/{s}": n for (k, s), n in sorted(kind_split.items())})
print("MC answer_index counts:", dict(sorted(idx_count.items())))
print("questions by number of doc_ids:", dict(sorted(hops.items())))
if errors:
    print("\nFAILED:")
    for e in errors:
        print("  -", e)
    sys.exit(1)
print("OK")
