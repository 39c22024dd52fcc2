"""eval end to end on the bundled 135M model: a squad_short KB with its FAISS index and a real
(untrained) LoRA adapter, every mode on the same dev questions, the report files, the router entry,
the HTTP path against the real kinject server, and multiple choice by log-likelihood."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import attach_untrained_lora, shared_dataset
from tests.conftest import running

pytestmark = pytest.mark.shared_data

FOUR = ["base", "rag", "ft", "ft-rag"]
N_DEV = 20  # enough for the router's grid search (eval.router.MIN_ROUTER_QUESTIONS)


@pytest.fixture(scope="module")
def eval_kb(tmp_path_factory):
    """squad_short's corpus in a KB of its own, with an adapter attached."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.ingest.pipeline import ingest

    root = tmp_path_factory.mktemp("eval-kbs")
    # Short RAG prompts (1 passage of 100 tokens: prefill is most of a rag answer's time here)
    # keep four modes on CPU within the time budget; answers get the default eval.max_new_tokens
    # (32): the 135M model states the answer late in its sentence.
    settings = load_settings({"kb_root": str(root), "retrieval": {"top_k": 1}, "ingest": {"chunk_size": 100, "chunk_overlap": 10}})
    kb = KB.create(settings, "squad")
    ingest(kb, shared_dataset("squad_short") / "corpus.jsonl", settings, progress=False)
    attach_untrained_lora(kb, settings)
    return kb, settings


def with_eval(settings, **fields):
    """The same settings with these `eval` fields changed."""
    return settings.model_copy(update={"eval": settings.eval.model_copy(update=fields)})


@pytest.fixture(scope="module")
def squad_questions():
    return shared_dataset("squad_short") / "questions.jsonl"


@pytest.fixture(scope="module")
def four_modes(eval_kb, squad_questions, engine):
    from kinject.eval.run import evaluate

    kb, settings = eval_kb
    t0 = time.perf_counter()
    report = evaluate(kb, squad_questions, FOUR, settings, split="dev", limit=N_DEV, progress=False, engine=engine)
    print(f"\nfour modes x {N_DEV} questions: {time.perf_counter() - t0:.1f} s\n{report.table}")
    return report


def test_rag_beats_base_by_a_measured_margin(four_modes):
    s = four_modes.stats
    for mode in FOUR:
        assert s[mode]["f1"]["n"] == N_DEV and s[mode]["em"]["lo"] <= s[mode]["em"]["mean"] <= s[mode]["em"]["hi"]
    gain = s["rag"]["f1"]["mean"] - s["base"]["f1"]["mean"]
    contains_gain = s["rag"]["contains"]["mean"] - s["base"]["contains"]["mean"]
    print(f"F1 base {s['base']['f1']['mean']:.3f} rag {s['rag']['f1']['mean']:.3f}; contains base {s['base']['contains']['mean']:.3f} rag {s['rag']['contains']['mean']:.3f}")
    # Observed (first 20 dev questions, 32 new tokens, top_k 1 of 100-token chunks): F1 base 7.8
    # -> rag 15.2 (+7.3 points, paired bootstrap p = 0.008); contains-gold 5 -> 30. EM is 0 in
    # every mode: the 135M chat model answers in whole sentences, which exact match never credits.
    p = next(t["p"] for t in four_modes.paired if (t["a"], t["b"], t["metric"]) == ("base", "rag", "f1"))
    assert gain >= 0.03, f"rag F1 gain over base is only {gain:.3f}"
    assert p < 0.1, f"rag's F1 gain over base is not significant (p = {p:.3f})"
    assert contains_gain >= 0.15
    # Retrieval metrics exist for the rag modes only, and the gold passage is usually found.
    assert "recall" not in s["base"] and s["rag"]["recall"]["mean"] >= 0.8 and s["rag"]["mrr"]["mean"] >= 0.7
    assert s["rag"]["recall"] == s["ft-rag"]["recall"]  # same retrieval, different weights
    # The adapter is really used: ft answers differ from base on some question.
    rows = {(r["mode"], r["qid"]): r for r in four_modes.per_question}
    assert any(rows[("ft", q)]["prediction"] != rows[("base", q)]["prediction"] for _, q in rows if _ == "base")


def test_report_files_parse_and_chart_is_a_png(four_modes, eval_kb):
    import matplotlib.image

    kb, _ = eval_kb
    d = four_modes.dir
    assert d.parent == kb.root / "eval" and d.name.startswith("squad_short-dev-")
    report = json.loads((d / "report.json").read_text())
    assert report["modes"] == FOUR and report["n_questions"] == N_DEV
    assert report["models"]["llm_sha256"] and report["models"]["adapter_sha256"] and report["settings"]["retrieval"]["top_k"] == 1
    rows = [json.loads(line) for line in (d / "per_question.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * N_DEV and {r["mode"] for r in rows} == set(FOUR)
    assert all(isinstance(r["correct"], bool) and "prediction" in r for r in rows)
    table = (d / "table.md").read_text()
    assert table == four_modes.table
    for mode in FOUR:
        assert f"| {mode} |" in table
    assert "[" in table and "Paired tests" in table
    # Cost: each question's batch wall time (not its own latency) and the throughput.
    assert "| batch p50 s | batch p95 s | q/s | tokens/q |" in table
    for mode in FOUR:
        c = report["cost"][mode]
        assert 0 < c["batch_p50_s"] <= c["batch_p95_s"] and c["questions_per_s"] > 0
    # q/s is rounded to 4 decimals, which under load is more than 0.1 % of a small rate
    rag_wall = sum(r["wall_share_s"] for r in rows if r["mode"] == "rag")
    assert report["cost"]["rag"]["questions_per_s"] == round(N_DEV / rag_wall, 4)
    png = (d / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    img = matplotlib.image.imread(d / "chart.png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    # Paired tests: every pair of modes on each metric, with p in [0, 1].
    pairs = {(t["a"], t["b"], t["metric"]) for t in report["paired"]}
    assert ("base", "rag", "f1") in pairs and all(0 <= t["p"] <= 1 for t in report["paired"])
    assert not (kb.root / "eval" / ".partial").exists() or not any((kb.root / "eval" / ".partial").iterdir())


def test_eval_stage_records_the_router(four_modes, eval_kb, engine):
    from kinject.core.answer import Answerer
    from kinject.core.files import sha256_file

    kb, settings = eval_kb
    rec = kb.stage("eval")

    assert rec["fingerprint"] == sha256_file(four_modes.dir / "report.json")
    assert rec["inputs"] == {"ingest": kb.stage("ingest")["fingerprint"], "train": kb.stage("train")["fingerprint"]}
    router = rec["metrics"]["router"]
    best = max(["rag", "ft-rag"], key=lambda m: (four_modes.stats[m]["f1"]["mean"], m == "rag"))
    assert router["with_context"] == best and router["closed_book"] == "ft" and router["basis"].startswith("grid search")
    top1 = [max(s["score"] for s in r["sources"]) for r in four_modes.per_question if r["mode"] == best]
    assert min(top1) - 0.01 <= router["min_score"] <= max(top1) + 0.01
    assert router["routed_score"] >= max(router["all_context_score"], router["all_closed_score"])
    assert router["fitted_on"]["splits"] == ["dev"] and len(router["fitted_on"]["questions"]) == N_DEV
    # The service's auto mode now routes with it.
    cfg = Answerer(kb, settings, engine=engine).router_config()
    assert (cfg.min_score, cfg.with_context, cfg.source) == (router["min_score"], best, "eval report")
    assert rec["metrics"]["best_mode"] in FOUR and rec["metrics"]["modes"]["rag"]["f1"] == round(four_modes.stats["rag"]["f1"]["mean"], 4)


def test_auto_on_heldout_uses_the_dev_router_and_on_dev_is_flagged(four_modes, eval_kb, squad_questions, engine):
    """The router the four-mode run fitted on 20 dev questions routes auto on heldout questions
    (none of them fitted on: a measurement) and is never refitted there; auto on those same dev
    questions is flagged as fitted on them and is not the best mode."""
    from kinject.eval.run import evaluate

    kb, settings = eval_kb
    settings = with_eval(settings, max_new_tokens=4)  # what is checked is the routing, not the answers
    router = kb.stage("eval")["metrics"]["router"]
    held = evaluate(kb, squad_questions, ["rag", "ft", "ft-rag", "auto"], settings, split="heldout", limit=2, progress=False, engine=engine)
    used = held.info["auto_router_used"]
    assert (used["min_score"], used["with_context"], used["source"]) == (router["min_score"], router["with_context"], "eval report")
    assert (used["fitted_on_these"], used["fitted_n"], used["fitted_splits"]) == (0, N_DEV, ["dev"])
    assert held.router is None and kb.stage("eval")["metrics"]["router"] == router
    assert "| auto |" in held.table and "none of these" in held.table and "†" not in held.table

    dev = evaluate(kb, squad_questions, ["auto"], settings, split="dev", limit=2, progress=False, engine=engine)
    assert dev.info["auto_router_used"]["fitted_on_these"] == 2
    assert "| auto † |" in dev.table and "router fitted on these questions" in dev.table
    assert kb.stage("eval")["metrics"]["best_mode"] is None and kb.stage("eval")["metrics"]["router"] == router


def test_endpoint_gives_the_same_numbers_as_in_process(four_modes, eval_kb, squad_questions, engine):
    """The kinject server (retrieval on its side, sources in the response, one request at a time)
    gives the same answers and scores on 4 dev questions as the in-process run (batched)."""
    from kinject.core.engines import SamplingParams
    from kinject.eval import metrics as M
    from kinject.eval.backends import EndpointError, OpenAIBackend
    from kinject.eval.judge import JudgeError
    from kinject.eval.questions import load_questions
    from kinject.eval.run import evaluate
    from kinject.service.app import create_app

    kb, settings = eval_kb
    with running(create_app(kb, settings, engine)) as url:
        remote = evaluate(kb, squad_questions, ["rag"], settings, split="dev", limit=4, endpoint=url, progress=False)
        assert remote.info["backend"]["backend"] == "kinject-server" and four_modes.info["backend"]["backend"] == "in-process"
        local_rows = [r for r in four_modes.per_question if r["mode"] == "rag"][:4]
        answers = lambda rows: [(r["qid"], r["prediction"], [s["doc_id"] for s in r["sources"]]) for r in rows]  # noqa: E731
        assert answers(remote.per_question) == answers(local_rows)
        for metric in ("em", "f1", "contains", "recall", "mrr"):
            local = M.summarize([r["scores"][metric] for r in local_rows], settings.eval.bootstrap_samples, settings.seed)
            assert remote.stats["rag"][metric] == local, metric

        # The optional judge goes through any OpenAI-compatible endpoint; here the server's
        # adapter model grades in-process base answers (plumbing only: a 135M judge is no judge).
        judged = with_eval(settings, judge_base_url=url, judge_model="kinject-ft")
        report = evaluate(kb, squad_questions, ["base"], judged, split="dev", limit=2, progress=False, engine=engine)
        assert report.info["judge"]["model"] == "kinject-ft"
        assert [r["scores"]["judge"] in (0.0, 1.0) for r in report.per_question] == [True, True]
        assert "judge" in report.table
        with pytest.raises(JudgeError, match="is the endpoint under test"):
            evaluate(kb, squad_questions, ["base"], judged, split="dev", limit=2, endpoint=url, progress=False)

        # A plain OpenAI-compatible server (vLLM) is asked in base mode only, by its model name.
        plain = OpenAIBackend(url, settings, ["kinject-base"])
        with pytest.raises(EndpointError, match="only mode 'base' can be evaluated there, not 'rag'"):
            plain.check("rag")
        qs = load_questions(squad_questions, split="dev", limit=2)
        replies = plain.answer("base", qs, SamplingParams(max_new_tokens=4))
        assert [bool(r.text) and r.mode == "base" and r.sources == [] and 0 < r.completion_tokens <= 4 for r in replies] == [True, True]


def test_mc_acc_and_acc_norm_on_a_crafted_quality_case(engine):
    """Hand-checked: after a QuALITY question, a two-word reply beats a long repetitive one on
    summed log-likelihood, but the long one is far more predictable per character, so acc and
    acc_norm pick different options; both equal argmaxes of the engine's own log-likelihoods."""
    from kinject.core.answer import build_messages
    from kinject.core.engines import GenRequest
    from kinject.eval.mc import continuation, score_choices
    from kinject.eval.questions import load_questions

    q = load_questions(shared_dataset("quality_mc") / "questions.jsonl", split="dev")[0]
    context = engine.render(GenRequest(messages=build_messages([{"role": "user", "content": q.question}], None)))
    assert context.endswith("assistant\n")
    long = "I do not know. " * 12
    choices = ["I do not know.", long.strip(), "Purple elephants."]
    got = score_choices(engine, context, choices)
    direct = [ll for ll, _ in engine.loglikelihood([(context, continuation(context, c)) for c in choices])]
    assert got.logprobs == pytest.approx(direct)
    per_char = [lp / len(c) for lp, c in zip(direct, choices)]
    print("logprobs", [round(x, 2) for x in direct], "per char", [round(x, 3) for x in per_char])
    assert got.pred == direct.index(max(direct)) == 0  # summed: the short reply
    assert got.pred_norm == per_char.index(max(per_char)) == 1  # per character: the repetition


def test_choices_scored_on_one_shared_context_equal_each_scored_alone(engine):
    """The engine runs a context once for all the choices that follow it (its cache copied per
    choice); each choice scored in a batch of its own must get the same log-likelihood."""
    context = "<|im_start|>user\nWhich city is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    choices = ["Paris", "Lyon is the capital.", "It is Marseille, on the coast of the Mediterranean Sea.", "P"]
    shared = engine.loglikelihood([(context, c) for c in choices])
    alone = [engine.loglikelihood([(context, c)])[0] for c in choices]
    assert [s for _, s in shared] == [a for _, a in alone]  # greedy flags
    assert [ll for ll, _ in shared] == pytest.approx([ll for ll, _ in alone], abs=2e-3)
    assert max(shared)[0] == shared[0][0]  # "Paris" is the likeliest


def test_mixed_file_resumes_after_a_crash(eval_kb, squad_questions, engine, tmp_path, monkeypatch):
    """A file mixing short-answer and multiple-choice questions (choices = the gold answer and
    other questions' answers), in base and auto; a crash in the second mode leaves the first
    mode's rows, and the rerun answers only what is missing."""
    from kinject.eval import backends, run
    from kinject.eval.questions import load_questions

    kb, settings = eval_kb
    settings = with_eval(settings, max_new_tokens=4)  # what is checked is the resuming and routing, not the answers
    qs = load_questions(squad_questions, split="dev")[:4]
    path = tmp_path / "mixed.jsonl"
    rows = []
    for i, q in enumerate(qs):
        row = {"qid": q.qid, "question": q.question, "answer": q.answer, "doc_ids": list(q.doc_ids), "split": "dev"}
        if i % 2:
            others = [qs[(i + j) % len(qs)].answer for j in (1, 2, 3)]
            row["choices"] = others[:1] + [q.answer] + others[1:]
            row["answer_index"] = 1
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    calls: list[str] = []
    real = backends.LocalBackend.answer

    def crashing(self, mode, *a, **kw):
        calls.append(mode)
        if mode == "auto":
            raise RuntimeError("simulated crash")
        return real(self, mode, *a, **kw)

    monkeypatch.setattr(backends.LocalBackend, "answer", crashing)
    before = set((kb.root / "eval" / ".partial").glob("*/base.jsonl"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.evaluate(kb, path, ["base", "auto"], settings, progress=False, engine=engine)
    partial = list(set((kb.root / "eval" / ".partial").glob("*/base.jsonl")) - before)
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 4

    def counting(self, mode, *a, **kw):
        calls.append(mode)
        return real(self, mode, *a, **kw)

    monkeypatch.setattr(backends.LocalBackend, "answer", counting)
    calls.clear()
    report = run.evaluate(kb, path, ["base", "auto"], settings, progress=False, engine=engine)
    assert calls == ["auto"] and report.status == "resumed"  # base came from the partial file
    s = report.stats
    assert s["base"]["acc"]["n"] == 2 and s["base"]["f1"]["n"] == 2 and s["auto"]["acc_norm"]["n"] == 2
    # auto routes each question with the router the KB's last eval recorded (or the defaults).
    used = report.info["auto_router_used"]
    auto_rows = [r for r in report.per_question if r["mode"] == "auto"]
    for r in auto_rows:  # "top retrieval score 0.512 >= 0.350 (eval report)"
        top = float(r["route_reason"].split()[3])
        assert r["answered_by"] == (used["with_context"] if top >= used["min_score"] else "ft"), r["route_reason"]
        assert bool(r["sources"]) == (r["answered_by"] in ("rag", "ft-rag"))
    assert sum(report.cost["auto"]["answered_by"].values()) == 4 and "auto answered with" in report.table
    mc_rows = [r for r in report.per_question if r["kind"] == "mc"]
    assert all(r["pred_index"] == max(range(4), key=lambda i: r["logprobs"][i]) for r in mc_rows)
    assert not partial[0].exists()
    print(report.table)


def test_compare_and_cli_errors(four_modes, eval_kb, tmp_path):
    from typer.testing import CliRunner

    from kinject.cli import app
    from kinject.eval.report import compare

    d = four_modes.dir
    text = compare(d, d)
    assert "| rag | F1 |" in text and "+0.0 | 1.000" in text
    kb, settings = eval_kb
    env = {"KINJECT_KB_ROOT": str(settings.kb_dir)}
    r = CliRunner().invoke(app, ["eval", "--kb", kb.name, "--compare", d.name, str(d)], env=env)
    assert r.exit_code == 0, r.output
    assert "| ft-rag | EM |" in r.output
    r = CliRunner().invoke(app, ["eval", "--compare", str(tmp_path), str(d)], env=env)
    assert "no eval report at" in str(r.exception)
    r = CliRunner().invoke(app, ["eval", "--kb", kb.name, "--questions", str(d / "report.json"), "--modes", "rag,bogus"], env=env)
    assert "unknown mode(s) bogus; choose from base, rag, ft, ft-rag, auto" in str(r.exception)
    r = CliRunner().invoke(app, ["eval", "--kb", kb.name, "--questions", str(d / "report.json")], env=env)
    assert "report.json line 1: not valid JSON" in str(r.exception)
    r = CliRunner().invoke(app, ["eval", "--kb", kb.name], env=env)
    assert "eval needs --kb NAME and --questions FILE" in str(r.exception)


def test_a_kb_changed_during_the_run_is_refused(eval_kb, squad_questions, engine, monkeypatch):
    """No KB lock is held while answering (the service keeps serving uploads); an ingest that
    lands mid-run is caught at the end instead of mixing old and new answers into one report."""
    from kinject.eval import backends
    from kinject.eval.run import EvalError, evaluate

    kb, settings = eval_kb
    ingest = kb.stage("ingest")
    real = backends.LocalBackend.answer

    def ingest_lands(self, *a, **kw):
        out = real(self, *a, **kw)
        kb.record_stage("ingest", **{**ingest, "fingerprint": "a-new-index"})
        return out

    monkeypatch.setattr(backends.LocalBackend, "answer", ingest_lands)
    reports = sorted((kb.root / "eval").glob("*/report.json"))
    try:
        with pytest.raises(EvalError, match="ingest stage changed while evaluating"):
            evaluate(kb, squad_questions, ["base"], settings, split="dev", limit=1, progress=False, engine=engine)
    finally:
        kb.record_stage("ingest", **ingest)
    assert kb.stage("ingest") == ingest
    assert sorted((kb.root / "eval").glob("*/report.json")) == reports


def test_an_ingest_after_the_final_check_leaves_the_eval_stale(eval_kb, squad_questions, engine, monkeypatch):
    """The eval stage records the index and adapter its answers were made with, so an ingest that
    lands between the end-of-run check and the record does not pass for the one evaluated."""
    from kinject.eval import run
    from kinject.eval.reuse import reused_eval

    kb, settings = eval_kb
    ingest = kb.stage("ingest")
    real = run.write_report

    def ingest_lands(*a, **kw):
        out = real(*a, **kw)
        kb.record_stage("ingest", **{**ingest, "fingerprint": "a-new-index"})
        return out

    monkeypatch.setattr(run, "write_report", ingest_lands)
    try:
        report = run.evaluate(kb, squad_questions, ["base"], settings, split="dev", limit=1, progress=False, engine=engine)
        assert kb.stage("eval")["inputs"]["ingest"] == ingest["fingerprint"]
        assert reused_eval(kb, squad_questions, "dev", ["base"], settings, 1) is None
    finally:
        kb.record_stage("ingest", **ingest)
    reused = reused_eval(kb, squad_questions, "dev", ["base"], settings, 1)
    assert reused.status == "skipped" and reused.dir == report.dir
    assert (reused.stats, reused.per_question, reused.info, reused.table) == (report.stats, report.per_question, report.info, report.table)


def test_an_endpoint_gets_only_the_key_given_for_it():
    """`eval --endpoint URL` sends eval.endpoint_api_key and nothing else: not serve.api_key, not
    engine.openai_api_key (those are other servers' keys, and URL may be anyone's)."""
    import http.server
    import threading

    from kinject.core.engines import SamplingParams
    from kinject.core.settings import load_settings
    from kinject.eval.backends import connect

    seen: list[str | None] = []

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: dict) -> None:
            seen.append(self.headers.get("Authorization"))
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer({"object": "list", "data": [{"id": "kinject-base", "object": "model", "created": 0, "owned_by": "x"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            message = {"role": "assistant", "content": "ok"}
            self._answer({"id": "c", "object": "chat.completion", "created": 0, "model": "kinject-base", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    others = {"serve": {"api_key": "kj-serve-secret"}, "engine": {"openai_api_key": "sk-upstream-secret"}, "eval": {"judge_api_key": "sk-judge-secret"}}
    ask = [{"role": "user", "content": "hi"}]
    try:
        connect(url, load_settings(others))._ask("kinject-base", ask, SamplingParams(max_new_tokens=2))
        given = load_settings({**others, "eval": {"endpoint_api_key": "kj-for-this-endpoint"}})
        connect(url, given)._ask("kinject-base", ask, SamplingParams(max_new_tokens=2))
    finally:
        server.shutdown()
    assert seen == ["Bearer EMPTY"] * 2 + ["Bearer kj-for-this-endpoint"] * 2
