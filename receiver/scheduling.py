"""Decode scheduling policies: which pending stage a free decoder takes next, and which stages never run.

One implementation serves the live receiver (receiver/node.py, a thread pool over a Policy) and the
simulator (experiments/compute.py, SimPy workers over a Policy). A policy is a queue of Jobs, one per
stage, with four rules:

- **order**: ``fifo`` arrival order; ``newest`` round robin over streams (the part of the key before the
  first ``/``), streams in order of first arrival, so one stream's flood cannot hold back others (start-time
  fair queueing with unit costs: a stream's next image goes one round after its previous one, and an idle
  stream's first image joins the current round); ``edf`` earliest deadline first (no deadline = +inf);
  ``semantic-first`` stages without pixel layers before stages with them. Ties go by arrival.
- **supersession**: for ``newest``, ``edf`` and ``semantic-first`` a newer stage of a key replaces its
  pending older one (which leaves with ``"superseded"``: a newer stage of an image makes the older useless).
  ``newest`` keeps the key's place in its stream's turn; ``edf`` and ``semantic-first`` place the key by
  the new stage (its deadline, its layers, its arrival). ``fifo`` never supersedes: every stage is decoded.
- **one stage of a key at a time**: ``pop`` marks the keys it returns running; their later stages wait
  until the caller says ``done(key)``, so an image's stages are served in the order they were made.
- **queue_limit** (pending jobs, running ones not counted): a job that would make the queue longer than
  the limit leaves with ``"rejected"`` -- the job the policy would serve last, the incoming one included:
  ``fifo`` the incoming job; ``edf`` the latest deadline; ``semantic-first`` the newest stage with pixels;
  ``newest`` the newest image of the stream furthest ahead (so a flood rejects its own images, not others').
  A stage waiting for its image's running stage is never chosen. Supersession never needs a rejection.

``edf`` also drops, on ``expire(now)``, the waiting jobs whose deadline has passed (``"deadline"``); a job
waiting for its image's running stage is checked once that stage is done.

Cost: O(log n) per job (binary heaps with lazy deletion, compacted when half stale). ``pop(max_batch > 1)``
takes the next job and then the next ones of the same stage name and pixel count, in policy order, from a
heap per (stage, pixels) class, built the first time a batch is asked for.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

from miscnet.core.errors import MiscError

POLICIES = ("fifo", "newest", "edf", "semantic-first")

# A heap entry: (priority, seq of the key's head job, key). Valid while that job is the key's head and the
# key is eligible (pending, not running); anything else is stale and skipped.
_Entry = tuple[tuple, int, str]


@dataclass(slots=True)
class Job:
    key: str  # the image's key, e.g. "s0001/3"; the stream is the part before the first "/"
    index: int  # stage index within the image
    stage: str  # "semantic", "map", "pixel.0", ...
    pixels: int  # width * height the stage is drawn at
    arrived: float  # when the stage became available (the caller's clock)
    deadline: float | None = None  # absolute, same clock
    has_pixels: bool = False  # the stage uses pixel layers
    payload: Any = None  # whatever the worker needs (opaque to the policy)


class Policy:
    """Base class: a queue of jobs with supersession, per-key exclusion, a queue limit and batching.

    Subclasses set ``name``, ``supersedes`` and ``_priority`` (smaller is served first; ties by arrival).
    """

    name = ""
    supersedes = True

    def __init__(self, queue_limit: int | None = None):
        if queue_limit is not None and queue_limit < 1:
            raise MiscError(f"queue limit must be at least 1, not {queue_limit}")
        self.queue_limit = queue_limit
        self.clear()

    def clear(self) -> list[Job]:
        """Forget every pending job (running keys too); returns the pending ones."""
        left = [job for q in getattr(self, "_queues", {}).values() for _, job in q]
        self._seq = 0
        self._n = 0
        self._queues: dict[str, list[tuple[int, Job]]] = {}  # pending jobs per key, oldest first
        self._prio: dict[str, tuple] = {}  # eligible keys (pending, not running) -> their priority
        self._running: set[str] = set()
        self._heap: list[_Entry] = []
        self._classes: dict[tuple[str, int], list[_Entry]] | None = None  # built at the first batch
        self._class_entries = 0
        self._ready_n: dict[tuple[str, int], int] = {}  # eligible keys per class of their head job
        self._worst: list[tuple[tuple, int, str]] | None = [] if self.queue_limit is not None else None
        return left

    # ------------------------------------------------------------ what subclasses define
    def _priority(self, key: str, job: Job, old: tuple | None) -> tuple:
        """The priority of ``key`` with head ``job`` (``old``: its priority while already eligible)."""
        return ()

    def _on_eligible(self, key: str, prio: tuple) -> None:
        """Called when ``key`` is (re)queued eligible with ``prio``."""

    def _on_pop(self, prio: tuple) -> None:
        """Called with the priority of the first job of each batch popped."""

    # ------------------------------------------------------------ public
    def __len__(self) -> int:
        return self._n

    def running(self, key: str) -> bool:
        """Whether a job of ``key`` has been popped and not yet ``done``."""
        return key in self._running

    def done(self, key: str) -> None:
        """The popped job of ``key`` is finished: its next pending stage may be popped."""
        self._running.discard(key)
        if key in self._queues:
            self._make_eligible(key)

    def queued(self, key: str) -> int:
        """Pending jobs of ``key``."""
        q = self._queues.get(key)
        return len(q) if q else 0

    def push(self, job: Job, now: float) -> list[tuple[Job, str]]:
        """Queue ``job``; returns the jobs leaving unserved, with their reason ("superseded", "rejected")."""
        seq = self._seq
        self._seq += 1
        key = job.key
        q = self._queues.get(key)
        if q and self.supersedes:  # replace the pending stage: the queue keeps its length
            old = q[0][1]
            q[0] = (seq, job)
            prio = self._prio.get(key)
            if prio is not None:  # eligible: re-place it
                self._ready_n[(old.stage, old.pixels)] -= 1
                self._add(key, self._priority(key, job, prio), seq, job)
            return [(old, "superseded")]
        out = []
        if self.queue_limit is not None and self._n >= self.queue_limit:
            victim = self._victim(key, seq, job)
            if victim is None:
                return [(job, "rejected")]
            out.append((self._remove_head(victim), "rejected"))
        if q is None:
            q = self._queues[key] = []
        q.append((seq, job))
        self._n += 1
        if len(q) == 1 and key not in self._running:
            self._add(key, self._priority(key, job, None), seq, job)
        return out

    def ready(self, max_batch: int = 1) -> int:
        """How many jobs ``pop(now, max_batch)`` would return now."""
        top = self._top(self._heap)
        if top is None:
            return 0
        job = self._queues[top[2]][0][1]
        return min(max_batch, self._ready_n[(job.stage, job.pixels)])

    def pop(self, now: float, max_batch: int = 1) -> list[Job]:
        """The next job and up to ``max_batch - 1`` more of the same stage and pixels, in policy order.

        Their keys are running until ``done(key)``. [] when nothing is eligible.
        """
        top = self._top(self._heap)
        if top is None:
            return []
        heapq.heappop(self._heap)
        prio, _, key = top
        first = self._take(key)
        batch = [first]
        cls = (first.stage, first.pixels)
        if max_batch > 1 and self._ready_n[cls]:
            heap = self._class_heap(cls)
            while len(batch) < max_batch:
                entry = self._top(heap)
                if entry is None:
                    break
                heapq.heappop(heap)
                self._class_entries -= 1
                batch.append(self._take(entry[2]))
        self._on_pop(prio)
        return batch

    def expire(self, now: float) -> list[tuple[Job, str]]:
        """Jobs whose deadline has passed, removed (edf only; other policies keep them: [])."""
        return []

    # ------------------------------------------------------------ internals
    def _top(self, heap: list, sign: int = 1) -> _Entry | None:
        """The first valid entry of ``heap`` (stale ones above it are dropped), left in place.

        ``sign`` is -1 for the worst-first heap, whose entries hold negated priorities and seqs."""
        prio, queues = self._prio, self._queues
        while heap:
            entry = heap[0]
            key = entry[2]
            if key in prio and queues[key][0][0] == sign * entry[1]:
                return entry
            heapq.heappop(heap)
            if heap is not self._heap and sign == 1:
                self._class_entries -= 1
        return None

    def _make_eligible(self, key: str) -> None:
        seq, job = self._queues[key][0]
        self._add(key, self._priority(key, job, None), seq, job)

    def _add(self, key: str, prio: tuple, seq: int, job: Job) -> None:
        """Make ``key`` eligible with head ``job``: an entry in every heap."""
        self._prio[key] = prio
        cls = (job.stage, job.pixels)
        self._ready_n[cls] = self._ready_n.get(cls, 0) + 1
        self._on_eligible(key, prio)
        entry = (prio, seq, key)
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._prio) + 64:
            self._heap = self._entries()
        if self._classes is not None:
            heapq.heappush(self._classes.setdefault(cls, []), entry)
            self._class_entries += 1
            if self._class_entries > 2 * len(self._prio) + 64:
                self._build_classes()
        if self._worst is not None:
            heapq.heappush(self._worst, (tuple(-x for x in prio), -seq, key))
            if len(self._worst) > 2 * len(self._prio) + 64:
                self._worst = [(tuple(-x for x in p), -s, k) for p, s, k in self._entries()]
                heapq.heapify(self._worst)

    def _entries(self) -> list[_Entry]:
        heap = [(p, self._queues[k][0][0], k) for k, p in self._prio.items()]
        heapq.heapify(heap)
        return heap

    def _build_classes(self) -> None:
        self._classes = {}
        for entry in self._entries():
            job = self._queues[entry[2]][0][1]
            self._classes.setdefault((job.stage, job.pixels), []).append(entry)
        for heap in self._classes.values():
            heapq.heapify(heap)
        self._class_entries = len(self._prio)

    def _class_heap(self, cls: tuple[str, int]) -> list[_Entry]:
        if self._classes is None:
            self._build_classes()
        return self._classes.setdefault(cls, [])

    def _unready(self, key: str) -> tuple[int, Job]:
        """Remove ``key``'s head job from the pending ones (the key stops being eligible)."""
        q = self._queues[key]
        seq, job = q.pop(0)
        self._n -= 1
        del self._prio[key]
        self._ready_n[(job.stage, job.pixels)] -= 1
        if not q:
            del self._queues[key]
        return seq, job

    def _take(self, key: str) -> Job:
        _, job = self._unready(key)
        self._running.add(key)
        return job

    def _remove_head(self, key: str) -> Job:
        _, job = self._unready(key)
        if key in self._queues:  # fifo: the next stage of the key becomes eligible
            self._make_eligible(key)
        return job

    def _victim(self, key: str, seq: int, job: Job) -> str | None:
        """The eligible key whose head would be served last, if it is served after ``job``; else None."""
        worst = self._top(self._worst, -1)
        if worst is None:
            return None
        wkey = worst[2]
        if (self._priority(key, job, None), seq) > (self._prio[wkey], -worst[1]):
            return None
        return wkey


class Fifo(Policy):
    """Arrival order; every stage is decoded; a full queue rejects the incoming job."""

    name = "fifo"
    supersedes = False

    def _victim(self, key: str, seq: int, job: Job) -> str | None:
        return None


class Newest(Policy):
    """Newest stage per image; streams take turns (round robin, in order of first arrival)."""

    name = "newest"

    def clear(self) -> list[Job]:
        self._streams: dict[str, list[int]] = {}  # stream -> [rank (first-arrival order), its last round]
        self._round = 0  # the round being served
        self._ranks = 0
        self._prune_at = 64
        return super().clear()

    def _priority(self, key: str, job: Job, old: tuple | None) -> tuple:
        if old is not None:  # a superseding stage keeps the image's turn
            return old
        s = self._streams.get(key.partition("/")[0])
        if s is None:
            return (self._round, self._ranks)
        return (max(self._round, s[1] + 1), s[0])

    def _on_eligible(self, key: str, prio: tuple) -> None:
        stream = key.partition("/")[0]
        s = self._streams.get(stream)
        if s is None:
            self._streams[stream] = [prio[1], prio[0]]
            self._ranks += 1
            if len(self._streams) > self._prune_at:  # streams behind the current round are as good as new
                self._streams = {k: v for k, v in self._streams.items() if v[1] >= self._round}
                self._prune_at = max(64, 2 * len(self._streams))
        elif prio[0] > s[1]:
            s[1] = prio[0]

    def _on_pop(self, prio: tuple) -> None:
        if prio[0] > self._round:
            self._round = prio[0]


class Edf(Policy):
    """Earliest deadline first (no deadline: +inf), ties by arrival; expired jobs leave on ``expire``."""

    name = "edf"

    def _priority(self, key: str, job: Job, old: tuple | None) -> tuple:
        return (math.inf if job.deadline is None else job.deadline,)

    def expire(self, now: float) -> list[tuple[Job, str]]:
        out = []
        while (top := self._top(self._heap)) is not None and top[0][0] < now:
            heapq.heappop(self._heap)
            out.append((self._remove_head(top[2]), "deadline"))
        return out


class SemanticFirst(Policy):
    """Stages without pixel layers before stages with them, then arrival order."""

    name = "semantic-first"

    def _priority(self, key: str, job: Job, old: tuple | None) -> tuple:
        return (1 if job.has_pixels else 0,)


_CLASSES: dict[str, type[Policy]] = {p.name: p for p in (Fifo, Newest, Edf, SemanticFirst)}


def make_policy(name: str, queue_limit: int | None = None) -> Policy:
    """The policy called ``name`` (one of POLICIES)."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise MiscError(f"unknown decode policy {name!r} (choose from {', '.join(POLICIES)})")
    return cls(queue_limit)
