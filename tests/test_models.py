import json

import pytest

from kinject.core.engines import GenRequest, SamplingParams
from kinject.core.models import ModelUnavailable, resolve_model


def test_bundled_llm_answers_a_real_question(engine):
    [g] = engine.generate(
        [GenRequest(messages=[{"role": "user", "content": "What is the capital of France?"}], params=SamplingParams(max_new_tokens=24))]
    )
    assert "Paris" in g.text
    assert g.prompt_tokens > 5 and 0 < g.completion_tokens <= 24


def test_greedy_generation_is_deterministic_and_streams_the_same_text(engine):
    req = GenRequest(prompt="The three primary colours are", params=SamplingParams(max_new_tokens=12))
    a, b = engine.generate([req, req])
    assert a.text == b.text
    chunks = list(engine.stream(req))
    assert "".join(c.text for c in chunks) == a.text
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].completion_tokens == a.completion_tokens


def test_seeded_sampling_repeats(engine):
    req = GenRequest(prompt="A short poem about the sea:", params=SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7))
    assert engine.generate([req])[0].text == engine.generate([req])[0].text


def test_loglikelihood_prefers_the_true_continuation(engine):
    (paris, greedy), (berlin, _) = engine.loglikelihood([("The capital of France is", " Paris"), ("The capital of France is", " Berlin")])
    assert paris > berlin and greedy


def test_converted_gguf_is_a_plain_hf_folder(settings):
    path = resolve_model("smollm2-135m", settings)
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (path / "model.safetensors").exists() and (path / "tokenizer_config.json").exists()
    assert resolve_model("smollm2-135m", settings) == path  # cached, not converted again


def test_bundled_embedder_resolves_to_package_folder(settings):
    path = resolve_model("minilm-l6", settings)
    assert (path / "modules.json").exists()


def test_missing_hf_id_fails_clearly(settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as e:
        resolve_model("nobody/no-such-model-7b", settings)
    msg = str(e.value)
    assert "nobody/no-such-model-7b" in msg and "offline" in msg and "local" in msg


def test_cli_reports_unknown_model_on_one_line(tmp_path, monkeypatch, capsys):
    from kinject.cli import main

    monkeypatch.chdir(tmp_path)  # no .env from the repository
    with pytest.raises(SystemExit) as e:
        main(["--set", "models.llm=/nonexistent/m.gguf", "config"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: invalid setting models")
