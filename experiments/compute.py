"""The receiver's compute in virtual time (SimPy): decode workers taking stages from a scheduling Policy.

The policy is the live receiver's own (receiver/scheduling.py): the same order, supersession, queue limit
and one-stage-of-an-image-at-a-time rule. A worker takes the next job and up to ``max_batch - 1`` more of
the same stage and pixel count; with fewer than ``max_batch`` such jobs eligible it waits up to
``max_wait_s`` for more (re-checking at every submission). A batch takes ``cost.service_time(stage,
pixels, batch)`` seconds. ``edf`` drops expired jobs whenever a job is submitted or a worker looks for work
(the drop's time is then, not the deadline).

Statistics: waits are ``start - job.arrived`` (submit a job at its ``arrived`` time for queueing figures),
the queue is the policy's pending jobs (those waiting for their image's running stage included).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import simpy

from miscnet.core.errors import MiscError
from miscnet.receiver.scheduling import Job, make_policy


class CostModel(Protocol):
    def service_time(self, stage: str, pixels: int, batch: int) -> float:
        """Seconds for a batch of ``batch`` such stages."""
        ...


@dataclass(frozen=True)
class ComputeConfig:
    workers: int = 1
    policy: str = "newest"
    queue_limit: int | None = None
    max_batch: int = 1
    max_wait_s: float = 0.0  # a worker with fewer than max_batch compatible jobs waits up to this long for more
    busy_power_w: float = 300.0  # energy: power while serving a batch
    idle_power_w: float = 50.0


class ComputeModel:
    def __init__(self, env: simpy.Environment, config: ComputeConfig, cost: CostModel,
                 on_done: Callable[[Job, float, float, int], None],  # job, start, end, worker index
                 on_drop: Callable[[Job, str, float], None]):  # job, reason, time
        if config.workers < 1 or config.max_batch < 1 or config.max_wait_s < 0:
            raise MiscError("compute: workers and max_batch must be at least 1, max_wait_s at least 0")
        self.env, self.config, self.cost = env, config, cost
        self._on_done, self._on_drop = on_done, on_drop
        self.policy = make_policy(config.policy, config.queue_limit)
        self._expires = self.policy.name == "edf"
        self._idle: list[simpy.Event] = []  # workers with nothing to do
        self._filling: list[simpy.Event] = []  # workers waiting for a batch to fill
        n = config.workers
        self._busy_s = [0.0] * n
        self._busy_since: list[float | None] = [None] * n
        self._jobs = [0] * n
        self._batches = [Counter() for _ in range(n)]
        # queue: the integral of its length over time, up to self._t
        self._t = env.now
        self._area = 0.0
        self._max_len = 0
        self.submitted = 0
        self._served = 0
        self._wait_sum = 0.0
        self._left = 0  # jobs that entered the queue and left it (served or dropped)
        self._sojourn_sum = 0.0
        self.drops: Counter[str] = Counter()
        for i in range(n):
            env.process(self._worker(i))

    # ------------------------------------------------------------ queue bookkeeping
    def _tick(self) -> None:
        now = self.env.now
        self._area += len(self.policy) * (now - self._t)
        self._t = now

    def _dropped(self, drops: list[tuple[Job, str]], incoming: Job | None = None) -> None:
        now = self.env.now
        for job, reason in drops:
            self.drops[reason] += 1
            if job is not incoming:  # it was in the queue
                self._left += 1
                self._sojourn_sum += now - job.arrived
            self._on_drop(job, reason, now)

    def submit(self, job: Job) -> None:
        """Queue ``job`` now."""
        self._tick()
        self.submitted += 1
        policy = self.policy
        if self._expires:
            self._dropped(policy.expire(self.env.now))
        drops = policy.push(job, self.env.now)
        if drops:
            self._dropped(drops, job)
        if len(policy) > self._max_len:
            self._max_len = len(policy)
        if self._filling:
            for ev in self._filling:
                ev.succeed()
            self._filling.clear()
        if self._idle and policy.ready():
            self._idle.pop().succeed()

    # ------------------------------------------------------------ workers
    def _worker(self, i: int):
        env, policy, cfg = self.env, self.policy, self.config
        fill_until: float | None = None  # while waiting for a batch to fill
        while True:
            if self._expires:
                self._tick()
                self._dropped(policy.expire(env.now))
            n = policy.ready(cfg.max_batch)
            if n == 0:
                fill_until = None
                ev = env.event()
                self._idle.append(ev)
                yield ev
                continue
            if n < cfg.max_batch and cfg.max_wait_s > 0:
                if fill_until is None:
                    fill_until = env.now + cfg.max_wait_s
                if env.now < fill_until:
                    ev = env.event()
                    self._filling.append(ev)
                    yield ev | env.timeout(fill_until - env.now)
                    if not ev.triggered:
                        self._filling.remove(ev)
                    continue
            fill_until = None
            self._tick()
            start = env.now
            batch = policy.pop(start, cfg.max_batch)
            wait = sum(start - job.arrived for job in batch)
            self._wait_sum += wait
            self._sojourn_sum += wait
            self._served += len(batch)
            self._left += len(batch)
            if self._idle and policy.ready():  # more work than this worker: wake another
                self._idle.pop().succeed()
            first = batch[0]
            self._busy_since[i] = start
            yield env.timeout(self.cost.service_time(first.stage, first.pixels, len(batch)))
            end = env.now
            self._busy_since[i] = None
            self._busy_s[i] += end - start
            self._jobs[i] += len(batch)
            self._batches[i][len(batch)] += 1
            for job in batch:
                policy.done(job.key)
            for job in batch:  # this worker looks for work next, and wakes another if there is more
                self._on_done(job, start, end, i)

    # ------------------------------------------------------------ results
    def stats(self, until: float) -> dict:
        """Figures from the start to ``until`` (normally env.now; a batch in progress counts up to it)."""
        # the queue's length has not changed since self._t (every change ticks)
        area = self._area + len(self.policy) * max(0.0, until - self._t)
        cfg = self.config
        workers = []
        for i in range(cfg.workers):
            busy = self._busy_s[i]
            if self._busy_since[i] is not None:
                busy += max(0.0, until - self._busy_since[i])
            workers.append({"busy_s": busy, "utilization": busy / until if until > 0 else 0.0,
                            "batches": dict(sorted(self._batches[i].items())), "jobs": self._jobs[i]})
        busy_total = sum(w["busy_s"] for w in workers)
        return {
            "workers": workers,
            "jobs_done": sum(self._jobs),
            "submitted": self.submitted,
            "queue": {
                "mean_length": area / until if until > 0 else 0.0,
                "max_length": self._max_len,
                "length": len(self.policy),
                "mean_wait_s": self._wait_sum / self._served if self._served else 0.0,  # served jobs
                "served": self._served,
                # Little's law: mean_length = (left / until) * mean_sojourn_s, up to the jobs still queued
                "left": self._left,
                "mean_sojourn_s": self._sojourn_sum / self._left if self._left else 0.0,
            },
            "energy_j": cfg.busy_power_w * busy_total + cfg.idle_power_w * max(0.0, cfg.workers * until - busy_total),
            "drops": dict(self.drops),
        }
