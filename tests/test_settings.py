import pytest

from kinject.core.settings import SettingsError, load_settings, parse_overrides


def test_defaults_are_the_local_preset(monkeypatch):
    monkeypatch.delenv("KINJECT_PRESET", raising=False)
    s = load_settings()
    assert s.preset == "local"
    assert s.models.llm == "smollm2-135m"
    assert s.models.embedder == "minilm-l6"
    assert s.engine.backend == "transformers"
    assert s.models.query_instruction == ""


def test_paper_preset_fills_defaults_and_flags_still_win():
    s = load_settings({"preset": "paper", "train": {"lr": 0.001}})
    assert s.models.embedder == "BAAI/bge-large-en-v1.5"
    assert s.models.query_instruction.startswith("Represent this sentence")
    assert s.engine.backend == "vllm"
    assert s.train.lr == 0.001
    assert s.train.lora_rank == 64  # from the preset


def test_precedence_flags_over_env_over_dotenv_over_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("KINJECT_TRAIN__LR=0.01\nKINJECT_TRAIN__EPOCHS=3\nKINJECT_PRESET=paper\n")
    s = load_settings()
    assert (s.train.lr, s.train.epochs, s.preset) == (0.01, 3.0, "paper")
    monkeypatch.setenv("KINJECT_TRAIN__LR", "0.02")
    s = load_settings()
    assert (s.train.lr, s.train.epochs) == (0.02, 3.0)
    s = load_settings(parse_overrides(["train.lr=0.03"]))
    assert (s.train.lr, s.train.epochs) == (0.03, 3.0)
    # the preset from .env still fills what nobody set
    assert s.models.embedder == "BAAI/bge-large-en-v1.5"
    monkeypatch.setenv("KINJECT_MODELS__EMBEDDER", "minilm-l6")
    assert load_settings().models.embedder == "minilm-l6"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"preset": "nope"}, "preset"),
        ({"augment": {"budget_tokens": -1}}, "augment.budget_tokens"),
        ({"train": {"lora_rank": 12}}, "train.lora_rank"),
        ({"models": {"llm": "/no/such/model.gguf"}}, "models.llm"),
        ({"ingest": {"chunk_size": 100, "chunk_overlap": 100}}, "ingest"),
        ({"nosuch": 1}, "nosuch"),
        ({"engine": {"openai_base_urls": ["http://a:8000/v1", "http://a:8000/v1/"]}}, "engine.openai_base_urls"),
        ({"engine": {"openai_base_urls": ["a:8000/v1"]}}, "engine.openai_base_urls"),
        ({"engine": {"data_parallel_size": 0}}, "engine.data_parallel_size"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_field(overrides, field):
    with pytest.raises(SettingsError) as e:
        load_settings(overrides)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"invalid setting {field}" in msg


def test_parse_overrides_nests_and_reads_json():
    assert parse_overrides(["a.b=1", 'a.c=["x","y"]', "d=e=f"]) == {"a": {"b": "1", "c": ["x", "y"]}, "d": "e=f"}
    with pytest.raises(SettingsError):
        parse_overrides(["novalue"])
