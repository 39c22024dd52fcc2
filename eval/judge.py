"""Optional LLM judge for short answers, through any OpenAI-compatible endpoint.

Off unless `eval.judge_base_url` is set. The judge must not be the model under test: an
endpoint being evaluated cannot also judge itself.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from kinject.core.errors import KinjectError
from kinject.core.settings import Settings

PROMPT = (
    "You grade answers to questions. The reference answer is correct. Reply with one word: "
    "'yes' if the candidate answer means the same as the reference answer, 'no' otherwise.\n\n"
    "Question: {question}\nReference answer: {gold}\nCandidate answer: {prediction}\n\nSame meaning (yes or no)?"
)


class JudgeError(KinjectError):
    pass


class Judge:
    def __init__(self, settings: Settings, evaluated_endpoint: str | None = None):
        from openai import OpenAI

        from kinject.eval.backends import base_url

        self.url = base_url(settings.eval.judge_base_url)
        if evaluated_endpoint and base_url(evaluated_endpoint) == self.url:
            raise JudgeError(f"the judge endpoint {self.url} is the endpoint under test; set eval.judge_base_url to another model's server")
        self.model = settings.eval.judge_model
        if not self.model:
            raise JudgeError("eval.judge_model is empty: name the judge's model (eval.judge_model=NAME)")
        self.workers = settings.engine.openai_max_concurrency
        self.client = OpenAI(
            base_url=self.url,
            api_key=settings.eval.judge_api_key.get_secret_value() or "EMPTY",
            timeout=settings.engine.openai_timeout_s,
            max_retries=settings.engine.openai_max_retries,
        )

    def describe(self) -> dict:
        return {"endpoint": self.url, "model": self.model}

    def grade(self, question: str, gold: str, prediction: str) -> float:
        import openai

        try:
            resp = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": PROMPT.format(question=question, gold=gold, prediction=prediction)}],
                max_tokens=4,
                temperature=0,
            )
        except (openai.APIStatusError, openai.APIConnectionError) as e:
            raise JudgeError(f"the judge at {self.url} failed: {e}") from None
        words = (resp.choices[0].message.content or "").strip().lower().split()
        return float(bool(words) and words[0].strip(".,!:;'\"") == "yes")

    def grade_many(self, items: list[tuple[str, str, str]]) -> list[float]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda it: self.grade(*it), items))


def make_judge(settings: Settings, evaluated_endpoint: str | None = None) -> Judge | None:
    return Judge(settings, evaluated_endpoint) if settings.eval.judge_base_url else None
