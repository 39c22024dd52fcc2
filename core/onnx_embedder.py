"""A sentence-transformers embedder run on ONNX Runtime instead of torch.

The transformer is exported once from the local weights (torch's own ONNX exporter, nothing
downloads) into `<cache>/onnx/<name>-<weights hash>-<precision>-v<N>/model.onnx`, written
atomically under a file lock, so two processes racing to export are safe. Tokenizing, pooling and
normalizing stay in Python, as sentence-transformers does them; only the forward pass moves to
ONNX Runtime, which is about twice as fast as torch for MiniLM on a small CPU.

Precisions:
- `fp32`: the same arithmetic as torch, reordered: vectors agree with the torch backend to a
  cosine of 0.99999+, so an index embedded by one is searched by the other without loss.
- `int8`: weights dynamically quantized (onnxruntime.quantization). Faster still, but its vectors
  differ from fp32 ones (cosine ~0.9), so an index records which numerics built it
  (`EMBEDDER_NUMERICS`) and ingest re-embeds when they change.

`OnnxSentenceEncoder` offers the part of SentenceTransformer's interface that `Embedder` uses.
"""
from __future__ import annotations

import json
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from kinject.core.errors import KinjectError
from kinject.core.files import atomic_dir, read_json, sha256_file

_EXPORT_VERSION = 1  # bump when the exported folder's content changes
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Which vectors a backend produces: backends with the same numerics give interchangeable vectors.
EMBEDDER_NUMERICS = {"torch": "fp32", "onnx": "fp32", "onnx-int8": "int8"}


class OnnxUnsupported(KinjectError):
    """The model's sentence-transformers pipeline has a module this runner does not reproduce."""


def pipeline_config(folder: Path) -> dict:
    """Pooling mode, lower-casing and max_seq_length of a sentence-transformers folder.

    Supports Transformer -> Pooling (mean or CLS) -> optional Normalize, the layout of MiniLM, bge,
    e5 and gte; a folder without modules.json is a plain transformer, which sentence-transformers
    mean-pools. Anything else (Dense layers, other poolings) raises OnnxUnsupported."""
    modules = read_json(folder / "modules.json")
    pooling = {"pooling_mode_mean_tokens": True}
    if modules is not None:
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]) or modules[0].get("path", ""):
            raise OnnxUnsupported(f"the ONNX embedder backend runs Transformer -> Pooling [-> Normalize] pipelines; {folder} has {kinds}: use models.embedder_backend=torch")
        pooling = read_json(folder / modules[1]["path"] / "config.json", {})
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
        raise OnnxUnsupported(f"the ONNX embedder backend supports mean or CLS pooling; {folder} uses {modes}: use models.embedder_backend=torch")
    st = read_json(folder / "sentence_bert_config.json", {})
    return {"pooling": "cls" if modes == ["pooling_mode_cls_token"] else "mean", "max_seq_length": st.get("max_seq_length"), "do_lower_case": bool(st.get("do_lower_case", False))}


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger; keep it out of the user's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _weights_hash(folder: Path) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return sha256_file(folder / name)[:12]
    raise OnnxUnsupported(f"no model.safetensors or pytorch_model.bin in {folder}")


def export_onnx(folder: Path, cache: Path, precision: str = "fp32") -> Path:
    """The cached ONNX file of the transformer in `folder`, exported (and quantized) on first use."""
    from kinject.core.models import _file_lock

    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
    folder = Path(folder)
    key = f"{folder.name if folder.name != 'model' else folder.parent.name}-{_weights_hash(folder)}-{precision}-v{_EXPORT_VERSION}"
    target = cache / "onnx" / key
    if (target / "model.onnx").is_file():
        return target / "model.onnx"
    with _file_lock(cache / "onnx" / f".{key}.lock"):
        if (target / "model.onnx").is_file():  # another process finished it while we waited
            return target / "model.onnx"
        with atomic_dir(target) as tmp, warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it treats as constant
            if precision == "fp32":
                _export_fp32(folder, tmp / "model.onnx")
            else:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                fp32 = export_onnx(folder, cache, "fp32")
                quantize_dynamic(fp32, tmp / "model.onnx", weight_type=QuantType.QInt8, per_channel=True)
            (tmp / "kinject-source.json").write_text(json.dumps({"source": str(folder), "key": key, "precision": precision}))
    return target / "model.onnx"


def _export_fp32(folder: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    names = [n for n in _INPUTS if n in tokenizer.model_input_names]

    class Body(torch.nn.Module):  # named inputs in, last hidden state out
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args))).last_hidden_state

    # A padded batch of two, so the attention-mask path is what gets traced.
    sample = tokenizer(["an example sentence to trace", "a shorter one"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with torch.inference_mode():
        torch.onnx.export(
            Body().eval(), tuple(sample[n] for n in names), str(out), input_names=names, output_names=["last_hidden_state"],
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )


class OnnxSentenceEncoder:
    """SentenceTransformer's `encode` for a Transformer -> Pooling -> Normalize folder, on ONNX Runtime."""

    def __init__(self, folder: Path, cache: Path, precision: str = "fp32", threads: int | None = None) -> None:
        import onnxruntime as ort
        import torch
        from transformers import AutoTokenizer

        self.config = pipeline_config(folder)
        self.path = export_onnx(folder, cache, precision)
        self.precision = precision
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.max_seq_length = int(self.config["max_seq_length"] or min(self.tokenizer.model_max_length, 512))
        opts = ort.SessionOptions()
        # One thread per text, and as many texts at once as torch uses threads in this process (the
        # tests' children run on one): a short text's matrices are too small to split well, so on 2
        # cores two texts side by side embed 1.45x as fast as one text on two threads, with the
        # same vectors.
        self.threads = threads or torch.get_num_threads()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._dim = int(self.session.get_outputs()[0].shape[-1])
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kinject-onnx") if self.threads > 1 else None

    def eval(self) -> "OnnxSentenceEncoder":
        return self

    def get_sentence_embedding_dimension(self) -> int:
        return self._dim

    def encode(self, texts: list[str], batch_size: int = 32, normalize_embeddings: bool = True, convert_to_numpy: bool = True, **_) -> np.ndarray:
        """Each text runs alone, `self.threads` texts at a time (`batch_size` is accepted for
        SentenceTransformer's interface):
        int8's dynamic quantization scales activations per call, so in a batch a text's vector
        would depend on its batch-mates, and an incremental ingest would differ from a fresh
        one; unpadded single texts are also faster on CPU (MiniLM, 2 cores: int8 93 chunks/s
        alone vs 57 in batches of 32, fp32 48 vs 31)."""
        # Tokenized here, one text at a time: the tokenizer's truncation state is not thread-safe.
        feeds = [self._feed(text) for text in texts]
        vectors = list(self._pool.map(self._embed, feeds) if self._pool and len(feeds) > 1 else map(self._embed, feeds))
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, vecs in enumerate(vectors):
            if normalize_embeddings:
                vecs = vecs / np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)
            out[row] = vecs[0]
        return out

    def _feed(self, text: str) -> dict[str, np.ndarray]:
        text = str(text).strip()
        if self.config["do_lower_case"]:
            text = text.lower()
        enc = self.tokenizer([text], truncation="longest_first", max_length=self.max_seq_length, return_tensors="np")
        return {n: enc[n].astype(np.int64) for n in self.input_names}

    def _embed(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The pooled vector of one tokenized text, shape (1, dim)."""
        hidden = self.session.run(None, feed)[0]
        if self.config["pooling"] == "cls":
            return hidden[:, 0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
