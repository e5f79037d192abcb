"""`miscnet loadgen`: N live senders (real gRPC on loopback) through a relay's shared bottleneck; bad input."""

import csv
import json
import socket
import tomllib
from pathlib import Path

import pytest

from miscnet.cli.main import main
from miscnet.core.container import layers_digest
from miscnet.experiments.fleet import FleetImage, parse_fleet, run_fleet
from miscnet.experiments.loadgen import LocalNodes, Topology, capture_plan, encode_images, simple_spec, topology_of

SMALL = ["astronaut", "chelsea"]
BUDGET = 900  # one encoding per sample for the whole module (encode_images caches)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def outputs(out: Path):
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "summary.json").read_text())["points"][0]


def events(folder: Path):
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def test_local_fleet_through_one_shared_bottleneck(tmp_path, capsys):
    """Four live senders, each on its own stream, through the relay's one fair-queued bottleneck."""
    out = tmp_path / "lg"
    code, stdout, err = run(capsys, "loadgen", "--local", "--senders", 4, "--images", ",".join(SMALL), "--every",
                            "1s", "--duration", "2s", "--budget", BUDGET, "--shared-rate", "256kbit", "--protect",
                            "arq", "--seed", 3, "-o", out)
    assert code == 0, err
    rows, point = outputs(out)
    plan = capture_plan(simple_spec(4, SMALL, "every 1s", "2s", 3, budget_bytes=BUDGET))
    assert len(rows) == sum(len(p) for p in plan) == 8 and point["images"] == 8 and point["complete"] == 8
    # every image arrived whole (bit-exact: the receiver's digest of the layers is the sender's) and was pictured
    encoded = encode_images(SMALL, BUDGET)
    stored = {e["image"]: e["digest"] for e in events(out / "receiver") if e["status"] == "stored"}
    assert stored == {c.label: layers_digest(encoded[c.image].layers) for p in plan for c in p}
    assert all(r["complete"] == "True" and r["first_picture_s"] and r["last_stage_s"] and not r["failure"]
               for r in rows)
    assert all(float(r["first_picture_s"]) <= float(r["last_stage_s"]) for r in rows)
    # one stream per sender at the receiver, and a different one for each sender
    streams = {}
    for r in rows:
        streams.setdefault(r["sender"], set()).add(r["stream"])
    assert len(streams) == 4 and all(len(s) == 1 for s in streams.values())
    assert len({next(iter(s)) for s in streams.values()}) == 4
    # the shared link carried every stream: four flows at the DRR port, and all of the senders' packets
    shared = point["links"]["shared"]
    assert len(shared["flow_bytes"]) == 4 and min(shared["flow_bytes"]) > 0
    sent = sum(p["packets_sent"] for p in point["per_sender"])
    assert shared["packets_delivered"] >= sent and shared["bytes_delivered"] == sum(shared["flow_bytes"])
    assert [p["images"] for p in point["per_sender"]] == [len(p) for p in plan]
    assert all(p["wire_bytes"] > 0 and len(p["streams"]) == 1 for p in point["per_sender"])
    assert point["first_picture_p50_s"] is not None and "8 complete" in stdout


def test_capture_plan_is_the_simulators_schedule(tmp_path):
    """Same scenario and seed: the live senders capture at the simulator's times, the same images."""
    (tmp_path / "flat.up").write_text("".join(f"{ms}\n" for ms in range(1, 2001, 4)))  # a Mahimahi trace, 2 s
    raw = {"name": "t", "duration": "30s", "seed": 11, "encoder": {"budget": BUDGET}, "group": [
        {"name": "a", "count": 2, "images": ["astronaut", "chelsea"], "arrival": "poisson 0.3/s"},
        {"name": "b", "count": 2, "images": ["chelsea"], "arrival": "every 7s", "start": "random",
         "access": {"trace": "flat.up", "trace_offset": "random"}}]}
    spec = parse_fleet(raw, "t", tmp_path)
    images = {n: FleetImage(n, e, {}) for n, e in encode_images(SMALL, BUDGET).items()}  # no quality needed here
    rows = run_fleet(spec, images, drain_s=5)["rows"]
    simulated = sorted((r["sender"], round(r["captured_s"], 6), r["image"], r["group"]) for r in rows)
    plan = capture_plan(spec)
    live = sorted((c.sender, round(c.at, 6), c.image, c.group) for p in plan for c in p)
    assert live == simulated and len(live) > 8
    # group b's senders each start at their own drawn place in the 2 s trace, which the relay is told
    offsets = [{c.trace_offset_s for c in p} for p in plan]
    assert offsets[:2] == [{None}, {None}] and all(len(o) == 1 for o in offsets[2:])
    b_offsets = [o.pop() for o in offsets[2:]]
    assert all(0 <= o < 2.0 for o in b_offsets) and b_offsets[0] != b_offsets[1]
    one_group = [parse_fleet({**raw, "group": [g]}, "t", tmp_path) for g in raw["group"]]
    assert [topology_of(s).stream_offsets for s in one_group] == [False, True]


def test_fleet_scenario_runs_live_on_its_topology(tmp_path, capsys):
    """--fleet --local: the scenario's access link and shared link become the relay's."""
    scenario = tmp_path / "s.toml"
    scenario.write_text("""
name = "tiny"
duration = "1.5s"
seed = 2
[encoder]
budget = 900
[[group]]
name = "cams"
count = 2
images = ["chelsea"]
arrival = "every 1s"
access = { rate = "512kbit", delay = "10ms" }
path = ["cell"]
protection = { mode = "arq" }
[[link]]
name = "cell"
rate = "300kbit"
discipline = "drr"
[report]
deadlines = ["5s"]
""")
    raw = tomllib.loads(scenario.read_text())
    topology = topology_of(parse_fleet(raw, "s.toml", tmp_path))
    assert topology.shared.rate_bps == 300e3 and topology.link.forward.rate_bps == 512e3
    raw["group"][0]["count"] = 3
    expected = sum(len(p) for p in capture_plan(parse_fleet(raw, "s.toml", tmp_path)))
    out = tmp_path / "o"
    code, stdout, err = run(capsys, "loadgen", "--local", "--fleet", scenario, "--senders", 3, "-o", out)
    assert code == 0, err
    rows, point = outputs(out)
    assert point["senders"] == 3 and point["images"] == len(rows) == expected and point["complete"] == expected
    assert expected >= 3 and {r["sender"] for r in rows} == {"0", "1", "2"}
    assert "psnr_at_5s" in rows[0] and all(r["psnr_at_5s"] for r in rows)  # measured on the PNGs it wrote
    assert len(point["links"]["shared"]["flow_bytes"]) == 3


def test_remote_target_with_watch(tmp_path, capsys):
    """--to a relay started elsewhere, --watch its receiver: stage times come from the Watch RPC."""
    link = __import__("miscnet.channel.link", fromlist=["DuplexConfig"])
    topology = Topology(link.DuplexConfig(link.LinkConfig.from_strings(rate="1mbit", delay="5ms")),
                        link.LinkConfig.from_strings(rate="512kbit", discipline="drr", name="shared"))
    with LocalNodes(tmp_path / "rx", topology) as nodes:
        code, stdout, err = run(capsys, "loadgen", "--to", nodes.target, "--watch", nodes.receiver_target,
                                "--senders", 2, "--images", "chelsea", "--every", "5s", "--start", "0s",
                                "--duration", "1s", "--budget", BUDGET, "--pacing", "off", "-o", tmp_path / "o")
    assert code == 0, err
    rows, point = outputs(tmp_path / "o")
    assert len(rows) == 2 and all(r["complete"] == "True" and r["first_picture_s"] for r in rows)
    assert len({r["stream"] for r in rows}) == 2
    assert point["links"]["shared"]["packets_delivered"] >= sum(p["packets_sent"] for p in point["per_sender"])


def test_a_stream_ended_between_captures_is_opened_again(tmp_path, capsys):
    """Nodes that end idle streams (here after 2 s) between sparse captures: the next capture reconnects."""
    link = __import__("miscnet.channel.link", fromlist=["DuplexConfig"])
    topology = Topology(link.DuplexConfig(link.LinkConfig.from_strings(rate="1mbit", delay="5ms")))
    with LocalNodes(tmp_path / "rx", topology, idle_timeout_s=2.0) as nodes:  # more than the 1 s lead
        code, _, err = run(capsys, "loadgen", "--to", nodes.target, "--watch", nodes.receiver_target, "--senders", 1,
                           "--images", "chelsea", "--every", "5s", "--start", "0s", "--duration", "6s",
                           "--budget", BUDGET, "-o", tmp_path / "o")
        idle_ends = sum(node.counters.value("streams_idle_total") for node in (nodes.relay_node, nodes.receiver_node))
    assert code == 0, err
    rows, point = outputs(tmp_path / "o")
    assert len(rows) == 2 and all(r["complete"] == "True" and not r["failure"] for r in rows), \
        [(r["failure"], r["stream"]) for r in rows]
    assert idle_ends >= 1 and len({r["stream"] for r in rows}) == 2  # the second image came on a new stream


def test_a_sender_pipelines_its_captures_as_the_simulator_does(tmp_path, capsys):
    """Captures 0.2 s apart on a link that needs about a second per image: each starts at once, while the one
    before is still in flight on the same stream, and all arrive whole."""
    code, _, err = run(capsys, "loadgen", "--local", "--senders", 1, "--images", "chelsea", "--every", "0.2s",
                       "--start", "0s", "--duration", "0.5s", "--rate", "8kbit", "--budget", BUDGET,
                       "--protect", "arq", "-o", tmp_path / "o")
    assert code == 0, err
    rows, _ = outputs(tmp_path / "o")
    rows.sort(key=lambda r: float(r["captured_s"]))
    assert len(rows) == 3 and all(r["complete"] == "True" for r in rows) and len({r["stream"] for r in rows}) == 1
    started = [float(r["captured_s"]) + float(r["send_wait_s"]) for r in rows]
    delivered = [float(r["captured_s"]) + float(r["delivered_s"]) for r in rows]
    assert all(started[k + 1] < delivered[k] for k in range(2)), (started, delivered)


@pytest.mark.parametrize("argv, message", [
    (["--local", "--senders", "0"], "--senders: give 1 or more"),
    (["--local", "--senders", "2", "--images", "nosuch"], "unknown sample 'nosuch'"),
    (["--local", "--senders", "2", "--every", "soon"], "--every / --poisson / --times: bad time 'soon'"),
    (["--local", "--senders", "2", "--poisson", "-1"], "--every / --poisson / --times: 'poisson -1/s' is not"),
    (["--to", "127.0.0.1:9", "--senders", "1", "--shared-rate", "1mbit"], "--shared-rate is for --local"),
    (["--local", "--fleet", "capacity", "--images", "coffee"], "--fleet: the scenario sets"),
    (["--local", "--senders", "1", "--tls-ca", "ca.pem"], "drop --tls-ca"),
    (["--local", "--fleet", "no-such-scenario"], "no fleet scenario"),
    (["--local", "--senders", "2", "--set", "seed=1"], "--set changes a --fleet scenario"),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, "loadgen", *argv, "-o", tmp_path / "o")
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("miscnet: ")
    assert not (tmp_path / "o" / "results.csv").exists()


def test_port_in_use_and_unreachable_target(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run(capsys, "loadgen", "--local", "--listen", f"127.0.0.1:{port}", "--senders", 1,
                           "--images", "chelsea", "--budget", BUDGET, "-o", tmp_path / "o")
        assert code == 2 and err.startswith("miscnet: cannot listen") and err.count("\n") == 1
        # a port that listens but is no gRPC server: the streams cannot open, before any capture
        code, _, err = run(capsys, "loadgen", "--to", f"127.0.0.1:{port}", "--senders", 2, "--images", "chelsea",
                           "--budget", BUDGET, "--connect-timeout", "1", "-o", tmp_path / "o")
    assert code == 2 and err.startswith(f"miscnet: cannot reach 127.0.0.1:{port}") and err.count("\n") == 1
    assert not (tmp_path / "o" / "results.csv").exists()
