"""`train(kb, settings)`: the fine-tuning stage's one door.

Reads the KB's curated synthetic corpus (and, by setting, its documents), trains a LoRA adapter on
packed blocks, and writes into the KB's adapter/ folder: the peft adapter, report.json and
loss.png. Checkpoints live in adapter/checkpoints/ while training runs; a rerun after a crash or a
kill resumes from the newest one, and they are deleted once the adapter is written.

With `train.nproc` > 1 it starts that many processes through torchrun (distributed.py), each of
which calls `train` again and trains a share of every step; rank 0 holds the KB's lock and
writes everything, and this process returns the report rank 0 wrote.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from kinject.core.files import atomic_dir, sha256_file, sha256_text
from kinject.core.adapter_copy import ADAPTER_FILES, FULL_MODEL_DIR, adapter_files
from kinject.core.kb import KB
from kinject.core.settings import Settings
from kinject.core.stage import StageResult, StageTimer
from kinject.finetune import data, distributed, loop
from kinject.finetune.report import write_loss_png, write_report

log = logging.getLogger(__name__)

# Settings that change how often we save or how a step is split in memory or over processes, not
# what is learned: a run resumed with another split (the free memory changed) continues the same
# training.
_NOT_IN_RUN_KEY = {"save_every", "gradient_checkpointing", "micro_batch_size", "nproc"}


@dataclass(kw_only=True)
class TrainReport(StageResult):
    """Status "skipped" when the adapter is up to date with its inputs, "resumed" when training
    continued from a checkpoint of an interrupted run."""

    stage: ClassVar[str] = "train"
    adapter_dir: str
    steps: int = 0
    epochs: float = 0.0
    tokens_seen: int = 0
    corpus_tokens: int = 0
    blocks: int = 0
    final_loss: float | None = None
    loss_curve: list[list[float]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    resumed_from_step: int | None = None
    perplexity_base: float | None = None
    perplexity_adapted: float | None = None
    sources: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    base_model: str = ""
    merged_dir: str | None = None
    memory_plan: str = ""  # the line printed before training: estimate, free memory, micro-batch, checkpointing
    memory: dict = field(default_factory=dict)  # the same plan in numbers (bytes)
    influence: dict = field(default_factory=dict)  # with influence.enabled: the scores and the selection
    processes: int = 1  # training processes (train.nproc)

    def summary(self) -> str:
        if self.status == "skipped":
            return f"adapter is up to date in {self.adapter_dir} (inputs unchanged; use --force to retrain)"
        ppl = ""
        if self.perplexity_base is not None:
            ppl = f"; perplexity on the KB's documents {self.perplexity_base:.2f} (base) -> {self.perplexity_adapted:.2f} (adapted)"
        resumed = f" (resumed from step {self.resumed_from_step})" if self.resumed_from_step else ""
        if self.processes > 1:
            resumed += f" on {self.processes} processes"
        inf = ""
        if self.influence:
            i = self.influence
            inf = (
                f"\ninfluence: kept {i['kept']} of {i['samples']} synthetic samples ({i['kept_tokens']} of {i['tokens']} tokens; "
                f"top {i['share']:.0%} of each document), {i['scored']} scored in {i['cpu_seconds']:.0f} s CPU, {i['cached']} from the cache"
            )
        return (
            f"trained {self.steps} steps{resumed}, {self.epochs:.2f} epochs, {self.tokens_seen} tokens, "
            f"final loss {self.final_loss:.4f}, {self.tokens_per_second:.0f} tokens/s{ppl}; adapter in {self.adapter_dir}{inf}"
        )


def run_key(kb: KB, settings: Settings) -> tuple[str, dict[str, str]]:
    """What the adapter depends on: upstream fingerprints, train settings, base model, seed."""
    augment = kb.stage("augment")
    if not augment:
        raise data.TrainDataError(f"KB {kb.name!r} has no synthetic corpus yet: run `kinject augment --kb {kb.name}` first")
    inputs = {"augment": augment["fingerprint"]}
    ingest = kb.stage("ingest")
    if settings.train.include_documents and ingest:
        inputs["ingest"] = ingest["fingerprint"]
    train_settings = {k: v for k, v in settings.train.model_dump(mode="json").items() if k not in _NOT_IN_RUN_KEY}
    payload = {"inputs": inputs, "train": train_settings, "llm": settings.models.llm, "seed": settings.seed}
    if settings.influence.enabled:  # only then: an adapter trained without it keeps its key
        payload["influence"] = settings.influence.model_dump(mode="json", exclude={"guide", "rounds", "explore", "temperature"})
        if settings.influence.target_questions:
            payload["influence"]["target_questions"] = sha256_file(Path(settings.influence.target_questions).expanduser())
    key = sha256_text(json.dumps(payload, sort_keys=True))
    return key, inputs


def adapter_fingerprint(folder: Path, names: tuple[str, ...] = ADAPTER_FILES) -> str:
    return sha256_text("".join(f"{n}:{sha256_file(folder / n)};" for n in names if (folder / n).exists()))


def is_up_to_date(kb: KB, key: str) -> bool:
    rec = kb.stage("train")
    if not rec or rec.get("run_key") != key:
        return False
    folder = kb.dir("train")
    names = adapter_files(rec)
    return all((folder / n).exists() for n in names) and adapter_fingerprint(folder, names) == rec["fingerprint"]


def train(
    kb: KB,
    settings: Settings,
    progress: bool = True,
    *,
    force: bool = False,
    merge: bool = False,
    on_step: loop.OnStep | None = None,
) -> TrainReport:
    """Train (or skip, when nothing changed) the KB's adapter and record the `train` stage.
    `on_step` is called in the processes that train (not here, when they are started)."""
    timer = StageTimer()
    if settings.train.nproc > 1 and not distributed.is_running():
        return _train_on_processes(kb, settings, progress, force, merge, timer)
    # Rank 0 writes, so it alone holds the lock; the others follow its reading of the manifest.
    with kb.lock() if distributed.is_main() else nullcontext():
        key, inputs = run_key(kb, settings)
        folder = kb.dir("train")
        if distributed.agree(not force and is_up_to_date(kb, key)):
            return _skipped(kb, settings, folder, merge, timer)
        return _train(kb, settings, key, inputs, progress, merge, on_step, timer)


def _skipped(kb: KB, settings: Settings, folder: Path, merge: bool, timer: StageTimer) -> TrainReport:
    merged = None
    if merge and distributed.is_main() and not (folder / "merged" / "config.json").exists():
        merged = str(_merge(folder, settings))
    return TrainReport(
        status="skipped",
        adapter_dir=str(folder),
        base_model=kb.stage("train").get("base_model", ""),
        merged_dir=merged,
        **timer.elapsed(),
    )


def _train_on_processes(kb: KB, settings: Settings, progress: bool, force: bool, merge: bool, timer: StageTimer) -> TrainReport:
    """Start train.nproc processes that train together; their rank 0's report, read back."""
    with kb.lock():  # released before the launch: rank 0 takes it
        key, _ = run_key(kb, settings)
        folder = kb.dir("train")
        if not force and is_up_to_date(kb, key):
            return _skipped(kb, settings, folder, merge, timer)
    n = settings.train.nproc
    status = distributed.launch(kb.name, settings, force=force, merge=merge, progress=progress)
    if status != 0:
        how = f"torchrun was killed by signal {-status}" if status < 0 else f"torchrun exited with status {status}; its report above names the process that failed first"
        kept = loop.checkpoint_dirs(folder / "checkpoints")
        if kept:
            step = json.loads((kept[-1] / loop.STATE_FILE).read_text())["step"]
            resume = f"run the same command again to resume from the checkpoint of step {step}"
        else:
            resume = "no checkpoint was written yet: the same command starts over"
        raise distributed.DistributedTrainError(f"training on {n} processes stopped ({how}): {resume}")
    saved = json.loads((folder / "report.json").read_text())
    names = {f.name for f in fields(TrainReport)}
    report = TrainReport(**{k: v for k, v in saved.items() if k in names})
    report.merged_dir = str(folder / "merged") if merge else None
    report.seconds = timer.seconds  # rank 0's cpu_seconds are kept: this process only waited
    return report


def _train(kb: KB, settings: Settings, key: str, inputs: dict, progress: bool, merge: bool, on_step, timer: StageTimer) -> TrainReport:
    import torch

    from kinject.core.models import load_causal_lm
    from kinject.finetune.lora import trainable_model
    from kinject.finetune.perplexity import perplexity

    folder = kb.dir("train")
    checkpoints = folder / "checkpoints"
    warnings: list[str] = []

    main = distributed.is_main()
    base, tokenizer = load_causal_lm(settings.models.llm, settings)
    selection: dict = {}
    # Rank 0 collects (and, with influence, scores and caches) the samples; the others train on its.
    if main:
        samples = data.collect_samples(kb, settings, tokenizer, selection, progress)
        _keep_target_questions(folder, settings)
    samples = distributed.agree(samples if main else None)
    packed = data.build(samples, tokenizer, settings)
    if packed.short:
        warnings.append(
            f"the corpus has {packed.n_tokens} tokens, less than one block of {settings.train.block_size}: "
            "trained on one short block"
        )
    torch.manual_seed(settings.seed)
    model = trainable_model(base, settings)
    result = loop.run(model, packed, settings, checkpoints, sha256_text(key + packed.fingerprint), progress, on_step)

    documents = data.document_texts(kb) if main else []
    ppl_base = ppl_adapted = None
    if documents and not settings.train.full_finetune:
        ppl_base = round(perplexity(model, documents, adapter=None, tokenizer=tokenizer), 4)
        ppl_adapted = round(perplexity(model, documents, adapter="default", tokenizer=tokenizer), 4)

    per_step = settings.train.batch_size * settings.train.grad_accum
    report = TrainReport(
        status="resumed" if result.resumed_from else "ran",
        adapter_dir=str(folder),
        steps=result.steps,
        epochs=round(result.steps * per_step / packed.blocks_per_epoch, 3),
        tokens_seen=result.tokens_seen,
        corpus_tokens=packed.tokens_per_epoch,
        blocks=len(packed),
        final_loss=result.curve[-1][1] if result.curve else None,
        loss_curve=result.curve,
        tokens_per_second=round(result.tokens_this_run / max(result.train_seconds, 1e-9), 1),
        resumed_from_step=result.resumed_from,
        perplexity_base=ppl_base,
        perplexity_adapted=ppl_adapted,
        sources=packed.sources,
        warnings=warnings,
        base_model=settings.models.llm,
        memory_plan=result.memory_plan.get("line", ""),
        memory={k: v for k, v in result.memory_plan.items() if k != "line"},
        influence=selection,
        processes=result.processes,
        **timer.elapsed(),
    )
    if not main:
        return report

    files = _publish(kb, folder, model, tokenizer, settings, result.full_weights)
    written = asdict(report)
    if not written["influence"]:
        del written["influence"]  # the report of a run without influence stays as it was
    write_report(folder, {**written, "settings": settings.train.model_dump(mode="json"), "seed": settings.seed})
    write_loss_png(folder, result.curve, f"{kb.name}: {settings.models.llm}, {result.steps} steps")
    metrics = {
        "steps": report.steps,
        "epochs": report.epochs,
        "tokens_seen": report.tokens_seen,
        "final_loss": report.final_loss,
        "tokens_per_second": report.tokens_per_second,
        "seconds": report.seconds,
    }
    if ppl_base is not None:
        metrics.update(perplexity_base=ppl_base, perplexity_adapted=ppl_adapted)
    kb.record_stage(
        "train",
        fingerprint=adapter_fingerprint(folder, files),
        inputs=inputs,
        outputs={"files": list(files), "report": "adapter/report.json", "loss_png": "adapter/loss.png"},
        metrics=metrics,
        started_at=timer.started_at,
        base_model=settings.models.llm,
        run_key=key,
        full_finetune=settings.train.full_finetune,
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
    if merge:
        report.merged_dir = str(_merge(folder, settings, model, tokenizer))
    return report


def _keep_target_questions(folder: Path, settings: Settings) -> None:
    """The user's target questions, where the eval finds them to refuse them."""
    from kinject.core.influence import read_target_questions
    from kinject.core.synthetic import keep_target_questions

    inf = settings.influence
    keep_target_questions(folder, read_target_questions(inf.target_questions) if inf.enabled and inf.target_questions else [])


def _publish(kb: KB, folder: Path, model, tokenizer, settings: Settings, weights: dict | None = None) -> tuple[str, ...]:
    """Swap the new weights into adapter/ under a forgotten `train` record, so no reader ever
    sees a half-replaced adapter that the manifest claims is valid. `weights`: the whole model's,
    where FSDP left `model` holding only this process's share."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".publish."))
    try:
        if settings.train.full_finetune:
            model.save_pretrained(tmp / FULL_MODEL_DIR, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(tmp / FULL_MODEL_DIR)
            names: tuple[str, ...] = ()
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            names = ADAPTER_FILES
        kb.forget_stage("train")
        # An earlier run's other kind of output would make readers take the folder for it: a LoRA's
        # adapter_config.json beside a new whole model, or a whole model beside a new LoRA.
        if settings.train.full_finetune:
            for n in ADAPTER_FILES:
                (folder / n).unlink(missing_ok=True)
            with atomic_dir(folder / FULL_MODEL_DIR) as out:
                for p in (tmp / FULL_MODEL_DIR).iterdir():
                    os.replace(p, out / p.name)
            names = tuple(f"{FULL_MODEL_DIR}/{p.name}" for p in sorted((folder / FULL_MODEL_DIR).iterdir()))
        else:
            shutil.rmtree(folder / FULL_MODEL_DIR, ignore_errors=True)
            for n in names:
                os.replace(tmp / n, folder / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


def _merge(folder: Path, settings: Settings, model: Any = None, tokenizer: Any = None) -> Path:
    """A full model folder with the adapter folded in, for engines without LoRA support."""
    if settings.train.full_finetune:
        return folder / FULL_MODEL_DIR
    if model is None:
        from peft import PeftModel

        from kinject.core.models import load_causal_lm

        base, tokenizer = load_causal_lm(settings.models.llm, settings)
        model = PeftModel.from_pretrained(base, str(folder))
    merged = model.merge_and_unload()
    with atomic_dir(folder / "merged") as out:
        merged.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return folder / "merged"
