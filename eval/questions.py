"""Question files: JSONL, one question a line, short answer or multiple choice.

Short answer: `{"qid", "question", "answer", "doc_ids", "split"}` (squad_short, multihop_rag).
Multiple choice: the same plus `choices` (2 or more) and `answer_index` (quality_mc); `answer`
is then optional. One file may mix both kinds (demo/questions.jsonl). `doc_ids` and `split` are
optional; without `doc_ids` a question has no retrieval score.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kinject.core.errors import KinjectError
from kinject.core.files import jsonl_values

SHORT, MC = "short", "mc"


class QuestionsError(KinjectError):
    pass


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    answer: str | None = None
    doc_ids: tuple[str, ...] = ()
    split: str | None = None
    choices: tuple[str, ...] | None = None
    answer_index: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def kind(self) -> str:
        return MC if self.choices is not None else SHORT


def dataset_name(path: Path) -> str:
    """`.../squad_short/questions.jsonl` -> "squad_short"; `my_set.jsonl` -> "my_set"."""
    path = Path(path)
    return path.parent.name if path.stem == "questions" and path.parent.name else path.stem


def _parse(line_no: int, obj: object, where: str) -> Question:
    def bad(msg: str) -> QuestionsError:
        return QuestionsError(f"{where} line {line_no}: {msg}")

    if not isinstance(obj, dict):
        raise bad("expected a JSON object")
    for key in ("qid", "question"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise bad(f"missing or empty {key!r}")
    qid = obj["qid"]
    doc_ids = obj.get("doc_ids", [])
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
        raise bad(f"{qid}: 'doc_ids' must be a list of strings")
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        raise bad(f"{qid}: 'split' must be a string")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise bad(f"{qid}: 'answer' must be a string")
    choices, index = obj.get("choices"), obj.get("answer_index")
    if choices is None and index is None:
        if not answer or not answer.strip():
            raise bad(f"{qid}: a short-answer question needs a non-empty 'answer' (or give 'choices' and 'answer_index')")
    else:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise bad(f"{qid}: 'choices' must be a list of 2 or more non-empty strings")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(choices):
            raise bad(f"{qid}: 'answer_index' must be an integer from 0 to {len(choices) - 1}, got {index!r}")
        choices = tuple(choices)
    known = {"qid", "question", "answer", "doc_ids", "split", "choices", "answer_index"}
    return Question(
        qid=qid,
        question=obj["question"].strip(),
        answer=answer,
        doc_ids=tuple(doc_ids),
        split=split,
        choices=choices,
        answer_index=index,
        extra={k: v for k, v in obj.items() if k not in known},
    )


def load_questions(path: Path | str, split: str | None = None, limit: int | None = None) -> list[Question]:
    """Read and validate a question file; keep one split (in file order) and the first `limit`."""
    path = Path(path)
    if not path.is_file():
        raise QuestionsError(f"question file not found: {path}")
    questions: list[Question] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, obj in jsonl_values(f, path, QuestionsError):
            q = _parse(line_no, obj, str(path))
            if q.qid in seen:
                raise QuestionsError(f"{path} line {line_no}: duplicate qid {q.qid!r}")
            seen.add(q.qid)
            questions.append(q)
    if not questions:
        raise QuestionsError(f"{path} holds no questions")
    if split is not None:
        splits = sorted({q.split for q in questions if q.split})
        questions = [q for q in questions if q.split == split]
        if not questions:
            have = ", ".join(splits) if splits else "none (the file has no 'split' field)"
            raise QuestionsError(f"{path} has no questions in split {split!r}; splits present: {have}")
    if limit is not None:
        if limit < 1:
            raise QuestionsError(f"limit must be at least 1, got {limit}")
        questions = questions[:limit]
    return questions
