"""What every stage's door returns: a `StageResult`, whatever the stage.

Each stage's report subclasses it with its own numbers, and the door sets `status` from what it
did: "ran", "resumed" (it continued an interrupted run) or "skipped" (its inputs were unchanged,
so its outputs were reused). A recipe reads the status; it never infers it from the numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

from kinject.core.kb import now_iso

Status = Literal["ran", "resumed", "skipped"]
STATUSES = ("ran", "resumed", "skipped")


@dataclass(kw_only=True)
class StageResult:
    stage: ClassVar[str]  # the stage's name, as in the manifest
    status: Status
    seconds: float = 0.0  # wall time of the call
    # this process's CPU time during the call, all threads: a busy machine inflates wall time, this less so
    cpu_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"a stage's status is one of {', '.join(STATUSES)}, not {self.status!r}")

    def summary(self) -> str:
        """What the run did, in a few lines for the terminal."""
        raise NotImplementedError

    def status_line(self) -> str:
        note = "skipped: inputs unchanged, reused" if self.status == "skipped" else self.status
        return f"[{self.stage}] {note} in {self.seconds:.1f} s"


class StageTimer:
    """When a stage started (for its manifest record) and how long it has run since."""

    def __init__(self) -> None:
        self.started_at = now_iso()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self._t0, 3)

    @property
    def cpu_seconds(self) -> float:
        return round(time.process_time() - self._c0, 3)

    def elapsed(self) -> dict[str, float]:
        """The StageResult fields `seconds` and `cpu_seconds`, as of now."""
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds}
