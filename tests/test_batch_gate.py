"""The batch gate alone, without vLLM. Requests are coroutines on a real event-loop thread (the
helper the vLLM engine runs its loop with), sent from caller threads the way the engine's blocking
methods send them. Each request records its admission and holds its place in the engine until the
test releases it, so every step below is ordered by events, not by timing."""
from __future__ import annotations

import asyncio
import threading

import pytest

from kinject.core.engines.batch_gate import BatchGate
from kinject.core.engines.event_loop_thread import EventLoopThread

WAIT = 10  # seconds; reached only when a test fails, a passing wait ends on its event


class Request:
    """One request at the gate: `admitted` is set once it may run; it stays in the engine until
    `release()`. `withdraw()` cancels it the way a stream does (its stop turns true, then a wake)."""

    def __init__(self, gates: "Gates", name: str, adapter: str | None, scoring: bool) -> None:
        self.name = name
        self.admitted = threading.Event()
        self.cancel = threading.Event()
        self._gates = gates
        self._release = asyncio.Event()
        self.future = gates.loop_thread.submit(self._run(adapter, scoring))

    async def _run(self, adapter: str | None, scoring: bool) -> bool:
        gate = self._gates.gate
        entry = gate.exclusive() if scoring else gate.shared(adapter, self.cancel.is_set)
        async with entry as admitted:
            if not admitted:
                return False
            self._gates.admissions.append(self.name)
            self.admitted.set()
            await self._release.wait()
        return True

    def release(self) -> None:
        self._gates.loop_thread.loop.call_soon_threadsafe(self._release.set)

    def withdraw(self) -> None:
        self.cancel.set()
        self._gates.loop_thread.submit(self._gates.gate.wake()).result(WAIT)

    def wait_admitted(self) -> None:
        assert self.admitted.wait(WAIT), f"{self.name} was never admitted; admitted: {self._gates.admissions}"


class Gates:
    """A gate on its own event-loop thread, and the requests sent to it."""

    def __init__(self, one_adapter_per_batch: bool) -> None:
        self.loop_thread = EventLoopThread("test-batch-gate")
        self.gate = BatchGate(one_adapter_per_batch=one_adapter_per_batch)
        self.admissions: list[str] = []  # names, in the order the gate admitted them
        self.requests: list[Request] = []

    def send(self, name: str, adapter: str | None = None, scoring: bool = False) -> Request:
        request = Request(self, name, adapter, scoring)
        self.requests.append(request)
        self.settle()
        return request

    def settle(self) -> None:
        """Return once the loop has run what is ready now and what that makes ready, ten rounds
        deep (more than a release or a hand-off at the gate takes): a request that the gate would
        admit has then been admitted, and one it holds back is counted as waiting."""

        async def rounds() -> None:
            for _ in range(10):
                await asyncio.sleep(0)

        self.loop_thread.submit(rounds()).result(WAIT)

    def running(self) -> list[str]:
        self.settle()
        return [r.name for r in self.requests if r.admitted.is_set() and not r.future.done()]

    def close(self) -> None:
        for request in self.requests:
            request.cancel.set()
            request.release()
        self.loop_thread.submit(self.gate.wake()).result(WAIT)
        for request in self.requests:
            request.future.result(WAIT)
        self.loop_thread.stop(timeout=WAIT)
        assert self.loop_thread.loop.is_closed()


@pytest.fixture
def cpu_gates():
    """The gate as vllm-cpu uses it: one adapter per batch."""
    gates = Gates(one_adapter_per_batch=True)
    yield gates
    gates.close()


@pytest.fixture(params=[True, False], ids=["one-adapter-per-batch", "mixed-adapters"])
def any_gates(request):
    gates = Gates(one_adapter_per_batch=request.param)
    yield gates
    gates.close()


@pytest.mark.parametrize("adapter", [None, "a"])
def test_requests_of_one_adapter_run_together(cpu_gates, adapter):
    first, second, third = (cpu_gates.send(f"r{i}", adapter) for i in range(3))
    for request in (first, second, third):
        request.wait_admitted()
    assert cpu_gates.running() == ["r0", "r1", "r2"]


@pytest.mark.parametrize("running, other", [("a", "b"), (None, "a"), ("a", None)])
def test_another_adapter_waits_until_the_running_group_drains(cpu_gates, running, other):
    group = [cpu_gates.send(f"run{i}", running) for i in range(2)]
    for request in group:
        request.wait_admitted()
    late = cpu_gates.send("other", other)
    assert not late.admitted.is_set() and cpu_gates.gate.waiting(other) == 1
    group[0].release()
    assert cpu_gates.running() == ["run1"], "admitted while a request of another adapter still runs"
    group[1].release()
    late.wait_admitted()
    assert cpu_gates.gate.waiting(other) == 0


def test_adapters_share_a_batch_when_the_engine_computes_them_apart():
    """On CUDA vLLM keeps each request's LoRA to itself, so the gate lets adapters mix."""
    gates = Gates(one_adapter_per_batch=False)
    try:
        requests = [gates.send("a", "a"), gates.send("b", "b"), gates.send("base", None)]
        for request in requests:
            request.wait_admitted()
        assert gates.running() == ["a", "b", "base"]
    finally:
        gates.close()


def test_a_waiting_adapter_closes_the_running_group_to_newcomers(cpu_gates):
    first = cpu_gates.send("a1", "a")
    first.wait_admitted()
    other = cpu_gates.send("b", "b")
    newcomer = cpu_gates.send("a2", "a")
    assert cpu_gates.running() == ["a1"], "a newcomer joined its adapter's group ahead of the waiting one"
    first.release()
    other.wait_admitted()
    assert cpu_gates.running() == ["b"], "the newcomer ran before the request that waited longer"
    other.release()
    newcomer.wait_admitted()
    assert cpu_gates.admissions == ["a1", "b", "a2"]


def test_a_waiting_adapter_gets_its_turn_while_its_rival_keeps_sending(cpu_gates):
    """A caller thread keeps its adapter busy: each request is sent before the one before it
    ends, so without the closing rule that adapter's group would never drain."""
    first = cpu_gates.send("a0", "a")
    first.wait_admitted()
    other = cpu_gates.send("b", "b")
    sent = [first]
    failures: list[BaseException] = []

    def keep_sending() -> None:
        try:
            for i in range(1, 30):
                if other.admitted.is_set():
                    return
                sent.append(cpu_gates.send(f"a{i}", "a"))
                sent[-2].release()
                cpu_gates.settle()
        except BaseException as err:  # reported by the test thread
            failures.append(err)

    feeder = threading.Thread(target=keep_sending)
    feeder.start()
    feeder.join(WAIT * 3)
    assert not feeder.is_alive() and not failures
    other.wait_admitted()
    assert len(sent) == 2, f"{len(sent) - 1} requests of the busy adapter ran ahead of the waiting one"
    other.release()
    sent[-1].wait_admitted()


def test_a_cancelled_waiting_request_frees_its_place(cpu_gates):
    first = cpu_gates.send("a1", "a")
    first.wait_admitted()
    other = cpu_gates.send("b", "b")
    newcomer = cpu_gates.send("a2", "a")
    assert cpu_gates.running() == ["a1"]
    other.withdraw()
    assert other.future.result(WAIT) is False
    newcomer.wait_admitted()  # while a1 still runs: nobody of another adapter waits any more
    assert cpu_gates.running() == ["a1", "a2"]
    assert cpu_gates.gate.waiting("b") == 0 and "b" not in cpu_gates.admissions


def test_a_cancelled_request_wakes_those_that_looked_before_it_left(cpu_gates):
    """a2 waits in front of b (it came while c waited), so at the wake that b answers by leaving,
    a2 looks first and still sees b: only b's leaving can let a2 in while a1 runs."""
    first = cpu_gates.send("a1", "a")
    first.wait_admitted()
    third = cpu_gates.send("c", "c")
    newcomer = cpu_gates.send("a2", "a")
    other = cpu_gates.send("b", "b")
    third.withdraw()
    assert third.future.result(WAIT) is False
    assert cpu_gates.running() == ["a1"], "a2 joined while b waits"
    other.withdraw()
    assert other.future.result(WAIT) is False
    newcomer.wait_admitted()
    assert cpu_gates.running() == ["a1", "a2"]


def test_a_request_cancelled_before_its_turn_never_runs(cpu_gates):
    scorer = cpu_gates.send("score", scoring=True)
    scorer.wait_admitted()
    waiting = cpu_gates.send("base")
    waiting.withdraw()
    assert waiting.future.result(WAIT) is False
    scorer.release()
    after = cpu_gates.send("after")
    after.wait_admitted()
    assert cpu_gates.admissions == ["score", "after"]


def test_scoring_waits_for_an_idle_engine_and_runs_alone(any_gates):
    first = any_gates.send("a1", "a")
    first.wait_admitted()
    scorer = any_gates.send("score", scoring=True)
    newcomer = any_gates.send("a2", "a")
    assert any_gates.running() == ["a1"], "joined a batch while a scoring request waits"
    first.release()
    scorer.wait_admitted()
    second_scorer = any_gates.send("score2", scoring=True)
    assert any_gates.running() == ["score"], "something ran beside a scoring request"
    scorer.release()
    second_scorer.wait_admitted()  # a waiting scorer still holds generation requests back
    assert any_gates.running() == ["score2"]
    second_scorer.release()
    newcomer.wait_admitted()
    assert any_gates.admissions == ["a1", "score", "score2", "a2"]


def test_many_caller_threads_never_mix_adapters_or_scoring(cpu_gates):
    """Caller threads send requests of three adapters (None is one) and scoring requests at once,
    as the service's concurrent streams and generate calls do; every batch the gate lets form
    must hold one adapter only, and a scoring request must run alone."""
    gate, loop_thread = cpu_gates.gate, cpu_gates.loop_thread
    in_engine: list[str] = []  # what runs now: an adapter name, "" for none, "score"
    broken: list[str] = []
    largest_batch = 0

    async def one(kind: str) -> None:
        nonlocal largest_batch
        entry = gate.exclusive() if kind == "score" else gate.shared(kind or None)
        async with entry:
            others = set(in_engine)
            if kind == "score" and others or others - {kind}:
                broken.append(f"{kind!r} ran beside {sorted(others)}")
            in_engine.append(kind)
            largest_batch = max(largest_batch, len(in_engine))
            for _ in range(3):  # stay a few loop rounds, so that others come and go meanwhile
                await asyncio.sleep(0)
            in_engine.remove(kind)

    kinds = ["", "a", "b", "a", "", "b", "score", "a"]
    start = threading.Barrier(6)

    def caller(offset: int) -> None:
        start.wait(WAIT)
        for i in range(20):
            # two of one kind at once, as a generate() call sends its whole batch
            kind = kinds[(offset + i) % len(kinds)]
            pair = [loop_thread.submit(one(kind)) for _ in range(2)]
            for future in pair:
                future.result(WAIT * 3)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 6)
    assert not any(t.is_alive() for t in threads), "a caller is stuck at the gate"
    assert broken == []
    assert largest_batch > 1  # batches did form, so the check above looked at shared batches
    assert gate.waiting(None) == gate.waiting("a") == gate.waiting("b") == 0
