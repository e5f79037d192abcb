"""Decode scheduling policies (receiver/scheduling.py) on hand-made job sequences, and the live scheduler."""

import random
import threading

import pytest

from miscnet.core.errors import MiscError
from miscnet.receiver.node import DecodeScheduler
from miscnet.receiver.scheduling import POLICIES, Job, make_policy
from miscnet.receiver.stages import StageInput

STAGES = ("semantic", "map", "pixel.0", "pixel.1")


def job(key, index=0, arrived=0.0, deadline=None, pixels=64, stage=None):
    name = stage or STAGES[min(index, len(STAGES) - 1)]
    return Job(key, index, name, pixels, arrived, deadline, name.startswith("pixel"))


def drain(policy, now=0.0):
    """Pop one at a time, finishing each before the next: the order a single worker serves."""
    order = []
    while batch := policy.pop(now):
        (j,) = batch
        order.append((j.key, j.index))
        policy.done(j.key)
    return order


def test_make_policy_names_the_choices():
    assert POLICIES == ("fifo", "newest", "edf", "semantic-first")
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(MiscError, match="fifo, newest, edf, semantic-first"):
        make_policy("lifo")
    with pytest.raises(MiscError, match="at least 1"):
        make_policy("fifo", queue_limit=0)


def test_fifo_serves_every_stage_in_arrival_order():
    p = make_policy("fifo")
    for j in [job("a/0", 0), job("b/0", 0), job("a/0", 1), job("c/0", 0), job("a/0", 2)]:
        assert p.push(j, 0.0) == []  # never supersedes
    assert len(p) == 5
    assert drain(p) == [("a/0", 0), ("b/0", 0), ("a/0", 1), ("c/0", 0), ("a/0", 2)]


def test_a_running_key_waits_for_done():
    p = make_policy("fifo")
    for j in [job("a/0", 0), job("a/0", 1), job("b/0", 0)]:
        p.push(j, 0.0)
    assert [j.index for j in p.pop(0.0)] == [0] and p.running("a/0")
    assert [(j.key, j.index) for j in p.pop(0.0)] == [("b/0", 0)]  # a/0's next stage waits
    assert p.pop(0.0) == [] and len(p) == 1 and p.queued("a/0") == 1
    p.done("a/0")
    assert not p.running("a/0")
    assert [(j.key, j.index) for j in p.pop(0.0)] == [("a/0", 1)]


def test_newest_keeps_the_newest_stage_per_image():
    p = make_policy("newest")
    a0, b0, a1, a2 = job("s/a", 0), job("s/b", 0), job("s/a", 1), job("s/a", 2)
    assert p.push(a0, 0.0) == [] and p.push(b0, 0.0) == []
    assert p.push(a1, 0.0) == [(a0, "superseded")]
    assert p.push(a2, 0.0) == [(a1, "superseded")]
    assert len(p) == 2
    assert drain(p) == [("s/a", 2), ("s/b", 0)]  # a keeps its place in the stream's turn


def test_newest_supersedes_while_the_image_is_decoding():
    p = make_policy("newest")
    p.push(job("s/a", 0), 0.0)
    (running,) = p.pop(0.0)
    a1, a2 = job("s/a", 1), job("s/a", 2)
    assert p.push(a1, 0.0) == [] and p.push(a2, 0.0) == [(a1, "superseded")]
    assert p.pop(0.0) == []  # one stage of an image at a time
    p.done("s/a")
    assert [j.index for j in p.pop(0.0)] == [2]


def test_newest_streams_take_turns_in_order_of_first_arrival():
    p = make_policy("newest")
    for j in [job("A/0"), job("A/1"), job("A/2"), job("B/0"), job("C/0"), job("B/1")]:
        p.push(j, 0.0)
    assert [k for k, _ in drain(p)] == ["A/0", "B/0", "C/0", "A/1", "B/1", "A/2"]


def test_newest_a_flood_does_not_hold_back_a_newcomer():
    p = make_policy("newest")
    p.push(job("flood/0"), 0.0)
    (first,) = p.pop(0.0)  # a worker holds flood/0
    for i in range(1, 20):
        p.push(job(f"flood/{i}"), 0.0)
    p.push(job("honest/0"), 0.0)
    p.done(first.key)
    order = [k for k, _ in drain(p)]
    assert order[0] == "honest/0" and order[1:] == [f"flood/{i}" for i in range(1, 20)]


def test_edf_earliest_deadline_first_and_expiry():
    p = make_policy("edf")
    jobs = [job("a/0", deadline=5.0), job("b/0"), job("c/0", deadline=2.0), job("d/0", deadline=5.0),
            job("e/0", deadline=1.0)]
    for j in jobs:
        p.push(j, 0.0)
    assert p.expire(1.0) == []  # a deadline of 1.0 has not passed at 1.0
    assert p.expire(1.5) == [(jobs[4], "deadline")]
    assert drain(p, 1.5) == [("c/0", 0), ("a/0", 0), ("d/0", 0), ("b/0", 0)]  # no deadline: last; ties: arrival
    for name in ("fifo", "newest", "semantic-first"):
        q = make_policy(name)
        q.push(job("a/0", deadline=1.0), 0.0)
        assert q.expire(9.0) == [] and len(q) == 1


def test_edf_supersession_takes_the_new_deadline():
    p = make_policy("edf")
    p.push(job("a/0", 0, deadline=1.0), 0.0)
    p.push(job("b/0", 0, deadline=2.0), 0.0)
    old = p.push(job("a/0", 1, deadline=3.0), 0.0)
    assert [(j.index, r) for j, r in old] == [(0, "superseded")]
    assert drain(p) == [("b/0", 0), ("a/0", 1)]


def test_semantic_first_puts_stages_without_pixels_first():
    p = make_policy("semantic-first")
    for j in [job("a/0", 2), job("b/0", 0), job("c/0", 3), job("d/0", 1), job("e/0", 0)]:
        p.push(j, 0.0)
    assert drain(p) == [("b/0", 0), ("d/0", 1), ("e/0", 0), ("a/0", 2), ("c/0", 3)]


def test_queue_limit_rejects_what_would_be_served_last():
    fifo = make_policy("fifo", queue_limit=2)
    a, b, c = job("a/0"), job("b/0"), job("c/0")
    assert fifo.push(a, 0.0) == [] and fifo.push(b, 0.0) == []
    assert fifo.push(c, 0.0) == [(c, "rejected")] and len(fifo) == 2

    edf = make_policy("edf", queue_limit=2)
    late, soon, sooner = job("a/0", deadline=9.0), job("b/0", deadline=5.0), job("c/0", deadline=1.0)
    edf.push(late, 0.0), edf.push(soon, 0.0)
    assert edf.push(sooner, 0.0) == [(late, "rejected")]
    assert edf.push(job("d/0", deadline=7.0), 0.0)[0][0].key == "d/0"  # the latest deadline is the new one
    assert drain(edf) == [("c/0", 0), ("b/0", 0)]

    sf = make_policy("semantic-first", queue_limit=2)
    pix, sem = job("a/0", 2), job("b/0", 0)
    sf.push(pix, 0.0), sf.push(sem, 0.0)
    assert sf.push(job("c/0", 1), 0.0) == [(pix, "rejected")]  # the newest stage with pixels goes
    assert sf.push(new := job("d/0", 3), 0.0) == [(new, "rejected")]

    newest = make_policy("newest", queue_limit=3)
    for i in range(3):
        newest.push(job(f"flood/{i}"), 0.0)
    honest = job("honest/0")
    assert [(j.key, r) for j, r in newest.push(honest, 0.0)] == [("flood/2", "rejected")]
    assert [j.key for j, _ in newest.push(job("flood/3"), 0.0)] == ["flood/3"]  # a flood rejects its own
    assert newest.push(job("honest/0", 1), 0.0)[0][1] == "superseded"  # supersession needs no room
    assert [k for k, _ in drain(newest)] == ["flood/0", "honest/0", "flood/1"]


def test_pop_batches_the_same_stage_and_pixels_in_policy_order():
    p = make_policy("fifo")
    jobs = [job("a/0", 0), job("b/0", 2), job("c/0", 0), job("d/0", 0, pixels=128), job("e/0", 0), job("f/0", 0)]
    for j in jobs:
        p.push(j, 0.0)
    assert p.ready(3) == 3
    assert [j.key for j in p.pop(0.0, max_batch=3)] == ["a/0", "c/0", "e/0"]
    assert [j.key for j in p.pop(0.0, max_batch=3)] == ["b/0"]
    assert p.ready(3) == 1  # d/0 (128 pixels) then f/0
    assert [j.key for j in p.pop(0.0, max_batch=3)] == ["d/0"]
    assert [j.key for j in p.pop(0.0, max_batch=3)] == ["f/0"]
    assert p.pop(0.0, max_batch=3) == [] and p.ready() == 0


@pytest.mark.parametrize("name", POLICIES)
def test_random_operations_keep_the_books(name):
    """Every job is served once or leaves once; no key twice at a time; stages of a key in order."""
    rng = random.Random(7)
    p = make_policy(name, queue_limit=rng.choice([None, 5, 40]) if name != "fifo" else 30)
    pushed, out, running = [], [], {}
    served: dict[str, list[int]] = {}
    now = 0.0
    stage_of: dict[str, int] = {}
    for _ in range(5000):
        now += rng.random()
        r = rng.random()
        if r < 0.5:
            key = f"s{rng.randrange(6)}/{rng.randrange(30)}"
            index = stage_of[key] = stage_of.get(key, -1) + 1
            j = job(key, index, now, now + rng.uniform(0, 20), pixels=rng.choice([64, 128]),
                    stage=rng.choice(STAGES))
            pushed.append(j)
            out += p.push(j, now)
        elif r < 0.8:
            for j in p.pop(now, max_batch=rng.choice([1, 1, 3])):
                assert j.key not in running
                running[j.key] = j
                served.setdefault(j.key, []).append(j.index)
        elif running:
            key = rng.choice(sorted(running))
            del running[key]
            p.done(key)
        out += p.expire(now)
        assert len(p) <= (p.queue_limit or 10**9)
    for key in list(running):
        p.done(key)
    while batch := p.pop(now, 2):
        for j in batch:
            served.setdefault(j.key, []).append(j.index)
            p.done(j.key)
    ids = [id(j) for j, _ in out] + [id(j) for j in pushed if j.index in served.get(j.key, [])]
    assert sorted(ids) == sorted(id(j) for j in pushed) and len(p) == 0
    assert all(indices == sorted(indices) for indices in served.values())
    reasons = {r for _, r in out}
    assert reasons <= {"superseded", "rejected", "deadline"}
    assert ("superseded" in reasons) == (name != "fifo") and ("deadline" in reasons) == (name == "edf")


# ---------------------------------------------------------------- the live scheduler over a policy

def _stage(name="semantic"):
    return StageInput(name, 8, 8, ())


def test_live_scheduler_reports_superseded_stages_before_the_stage_that_replaced_them():
    log, gate, started = [], threading.Event(), threading.Event()

    def handle(key, stage, meta):
        started.set()
        gate.wait(10)
        log.append(("decoded", meta["i"]))

    def dropped(stage, meta, reason):
        log.append((reason, meta["i"]))

    scheduler = DecodeScheduler(handle, 1, dropped)
    try:
        assert scheduler.submit("s/a", _stage(), {"i": 0})
        assert started.wait(10)  # stage 0 is decoding
        assert scheduler.submit("s/a", _stage(), {"i": 1})
        assert not scheduler.submit("s/a", _stage(), {"i": 2})  # replaces 1
        assert not scheduler.submit("s/a", _stage(), {"i": 3})  # replaces 2
        assert scheduler.pending == 1 and log == []  # reported by a worker, not yet
        gate.set()
    finally:
        scheduler.close()
    assert log == [("decoded", 0), ("superseded", 1), ("superseded", 2), ("decoded", 3)]
    assert scheduler.superseded == 2


def test_live_scheduler_reports_rejections_in_stage_order():
    log, gate, started = [], threading.Event(), threading.Event()

    def handle(key, stage, meta):
        started.set()
        gate.wait(10)
        log.append((key, "decoded", meta["i"]))

    def dropped(stage, meta, reason):
        log.append((meta["key"], reason, meta["i"]))

    scheduler = DecodeScheduler(handle, 1, dropped, policy="fifo", queue_limit=1)
    try:
        scheduler.submit("s/a", _stage(), {"key": "s/a", "i": 0})
        assert started.wait(10)
        assert scheduler.submit("s/a", _stage(), {"key": "s/a", "i": 1})  # queued behind 0
        assert not scheduler.submit("s/a", _stage(), {"key": "s/a", "i": 2})  # full: after 1 is decoded
        assert not scheduler.submit("s/b", _stage(), {"key": "s/b", "i": 0})  # full, and b is idle: now
        assert log == [("s/b", "rejected", 0)]
        gate.set()
    finally:
        assert scheduler.close() == 0
    assert log[1:] == [("s/a", "decoded", 0), ("s/a", "decoded", 1), ("s/a", "rejected", 2)]


def test_live_scheduler_rejects_an_unknown_policy():
    with pytest.raises(MiscError, match="semantic-first"):
        DecodeScheduler(lambda *a: None, 1, policy="random")
