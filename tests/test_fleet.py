"""Fleets: scenario files, the simulated fleet against simulate and against closed forms, the command."""

import json

import pytest

from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.transport import TransportConfig
from miscnet.cli.main import main
from miscnet.experiments.fleet import FleetError, load_fleet, parse_fleet, prepare_images, run_fleet
from miscnet.experiments.simulate import Scenario, SimImage, simulate

BASE = """
name = "t"
duration = "{duration}"
seed = 3
[encoder]
budget = 1200
[[group]]
name = "cams"
count = {count}
images = ["astronaut"]
arrival = "{arrival}"
start = "{start}"
access = {{ rate = "64kbit", delay = "20ms" }}
path = {path}
protection = {{ mode = "arq" }}
[[link]]
name = "cell"
rate = "{cell}"
discipline = "{discipline}"
[receiver]
workers = {workers}
profile = "classical-cpu"
[report]
deadlines = ["2s", "10s"]
"""


def spec_of(tmp_path, **kw):
    values = dict(duration="30s", count=1, arrival="every 10s", start="0s", path='["cell"]', cell="10mbit",
                  discipline="fifo", workers=1)
    values.update(kw)
    path = tmp_path / "f.toml"
    path.write_text(BASE.format(**values))
    return load_fleet(path)


@pytest.fixture(scope="module")
def images():
    return prepare_images({"astronaut"}, 1200)


@pytest.mark.parametrize("loss", ["none", "random 30%", "gemodel 20% 40%"])
def test_one_sender_one_image_gives_simulates_numbers(tmp_path, images, loss):
    # the same random streams as simulate: sender 0's access and reverse links draw what simulate's do
    path = tmp_path / "f.toml"
    path.write_text(BASE.format(duration="1s", count=1, arrival="every 10s", start="0s", path="[]", cell="1mbit",
                                discipline="fifo", workers=1)
                    .replace('delay = "20ms" }', f'delay = "20ms", loss = "{loss}" }}'))
    result = run_fleet(load_fleet(path), images)
    (row,) = result["rows"]
    link = DuplexConfig(LinkConfig.from_strings(rate="64kbit", delay="20ms", loss=loss),
                        LinkConfig(rate_bps=1e6, delay_s=0.02, name="downlink"))
    (sim,) = simulate([SimImage("astronaut", images["astronaut"].encoded, None)],
                      Scenario(link=link, transport=TransportConfig("arq"), seed=3, quality=False))
    assert row["complete"] and row["delivered_s"] == sim["totals"]["completion_time_s"]
    assert row["wire_bytes"] == sim["totals"]["wire_bytes"]
    assert row["sender_state"] == sim["sender_state"] == "done"
    assert row["stages"] == len(sim["events"])
    if loss != "none":
        assert result["links"]["access (mean)"]["packets_lost"] == sim["totals"]["packets_lost"] > 0


def test_first_stage_with_semantic_and_map_costs_both_passes(tmp_path, images):
    from miscnet.experiments.profiles import load_profile

    profile = load_profile("diffusion-estimate")
    pixels = 512 * 512
    both = profile.service_time("semantic+map", pixels)
    assert both == pytest.approx(profile.service_time("semantic", pixels) + profile.service_time("map", pixels))
    classical = load_profile("classical-cpu")  # one render draws a map stage, whatever came before
    assert classical.service_time("semantic+map", pixels) == classical.service_time("map", pixels)
    spec = spec_of(tmp_path, duration="1s", path="[]")
    from dataclasses import replace

    spec = replace(spec, receiver=replace(spec.receiver, profile="diffusion-estimate"))
    (row,) = run_fleet(spec, images)["rows"]
    # the first stage decoded is semantic+map: it ends no sooner than both passes after its arrival
    assert row["semantic_s"] is not None and row["semantic_s"] >= both


def test_links_are_reported_over_time(tmp_path, images):
    spec = spec_of(tmp_path, duration="30s", count=8, arrival="every 1s", cell="64kbit", discipline="fifo")
    result = run_fleet(spec, images)
    series = result["series"]
    cell = series["links"]["cell"]
    assert len(series["t_s"]) == len(cell["utilization"]) == len(cell["queue_delay_ms"]) == len(cell["drops"]) > 20
    # eight senders offer far more than 64 kbit/s: the cell is busy and its queue builds up while they send
    busy = [u for t, u in zip(series["t_s"], cell["utilization"], strict=True) if 5 <= t <= 30]
    # a bin counts the packets that finish in it, so a 1200-byte packet (0.15 s here) straddling a boundary
    # moves up to 15 % between neighbours: judge two bins at a time
    assert min((a + b) / 2 for a, b in zip(busy, busy[1:], strict=False)) > 0.9
    assert max(cell["queue_delay_ms"]) > 1000
    assert cell["utilization"][-1] == 0 and cell["queue_delay_ms"][-1] == 0  # drained by the end of the run
    # what arrived is what the bins add up to
    total = sum(u * 64000 * series["bin_s"] / 8 for u in cell["utilization"])
    assert total == pytest.approx(result["links"]["cell"]["bytes_delivered"], rel=0.01)


def test_scaled_trace_access_links_on_offset_windows(tmp_path, images):
    trace = tmp_path / "lte.up"
    # a 1.2 Mbit/s recording (one 1500-byte opportunity every 10 ms) with a 2 s gap every 10 s
    trace.write_text("\n".join(str(t) for t in range(10, 10001, 10) if not 4000 < t <= 6000) + "\n")
    path = tmp_path / "f.toml"
    path.write_text(BASE.format(duration="40s", count=4, arrival="every 2s", start="0s", path="[]", cell="1mbit",
                                discipline="fifo", workers=4)
                    .replace('access = { rate = "64kbit", delay = "20ms" }',
                             'access = { trace = "lte.up", trace_rate = "64kbit", trace_offset = "random", '
                             'delay = "20ms" }'))
    spec = load_fleet(path)
    assert spec.groups[0].access.capacity_bps() == pytest.approx(64000, rel=0.02)
    result = run_fleet(spec, images)
    assert result["links"]["access (mean)"]["utilization"] > 0
    by_sender: dict[int, list] = {}
    for r in result["rows"]:
        by_sender.setdefault(r["sender"], []).append(r["delivered_s"])
    # offsets: the gaps fall on different captures for different senders
    assert len({tuple(v) for v in by_sender.values()}) == 4
    missing = tmp_path / "g.toml"
    missing.write_text(path.read_text().replace('"lte.up"', '"no-such.trace"'))
    with pytest.raises(FleetError, match=r"g.toml: group.cams.access.trace: no file 'no-such.trace' \(tried"):
        load_fleet(missing)


def test_fleet_points_run_on_dask_give_the_same_results(tmp_path, images):
    distributed = pytest.importorskip("distributed")
    from miscnet.experiments.fleet import run_fleet_sweep

    path = tmp_path / "f.toml"
    path.write_text(BASE.format(duration="10s", count=2, arrival="every 5s", start="random", path='["cell"]',
                                cell="1mbit", discipline="drr", workers=1)
                    + '[sweep]\n"group.cams.count" = [1, 2]\n')
    spec = load_fleet(path)
    run_fleet_sweep(spec, tmp_path, tmp_path / "one", progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        run_fleet_sweep(spec, tmp_path, tmp_path / "dask", dask=cluster.scheduler_address, progress=False)
    for name in ("results.csv", "links.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "dask" / name).read_text()


def test_senders_pipeline_and_every_image_completes(tmp_path, images):
    # one image every 0.1 s on a link that needs more than that per image: images overlap in flight
    spec = spec_of(tmp_path, duration="60s", arrival="every 0.1s", path="[]")
    result = run_fleet(spec, images)
    rows = result["rows"]
    assert len(rows) == 600 and all(r["complete"] for r in rows)  # no 256-image limit, no stop-and-wait
    overlap = sum(1 for a, b in zip(rows, rows[1:], strict=False)
                  if a["captured_s"] + a["delivered_s"] > b["captured_s"])
    assert overlap > 0


def test_fair_shared_link_gives_each_sender_its_share(tmp_path, images):
    spec = spec_of(tmp_path, duration="60s", count=4, arrival="every 0.2s", cell="64kbit", discipline="drr")
    result = run_fleet(spec, images)
    per_sender = {}
    for r in result["rows"]:
        per_sender[r["sender"]] = per_sender.get(r["sender"], 0) + r["complete"]
    counts = list(per_sender.values())
    assert max(counts) - min(counts) <= 0.1 * max(counts)


def test_receiver_compute_is_the_bottleneck_when_workers_are_few(tmp_path, images):
    one = run_fleet(spec_of(tmp_path, count=40, workers=1), images)["summary"]
    four = run_fleet(spec_of(tmp_path, count=40, workers=4), images)["summary"]
    assert four["last_stage_p95_s"] <= one["last_stage_p95_s"]


def test_same_seed_same_results(tmp_path, images):
    spec = spec_of(tmp_path, count=5, arrival="poisson 0.5/s", start="random")
    a, b = run_fleet(spec, images), run_fleet(spec, images)
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


@pytest.mark.parametrize("change, message", [
    ({"path": '["nowhere"]'}, r"group\.cams\.path: no \[\[link\]\] named 'nowhere'"),
    ({"arrival": "sometimes"}, r"group\.cams\.arrival: 'sometimes' is not"),
    ({"count": 0}, r"group\.cams\.count"),
])
def test_bad_scenarios_are_one_line_errors_naming_the_key(tmp_path, change, message):
    with pytest.raises(FleetError, match=message):
        spec_of(tmp_path, **change)


def test_unknown_keys_and_empty_groups_are_refused(tmp_path):
    with pytest.raises(FleetError, match=r"x\.toml: unknown key 'groups'"):
        parse_fleet({"groups": []}, "x.toml", tmp_path)
    with pytest.raises(FleetError, match=r"x\.toml: no \[\[group\]\]"):
        parse_fleet({}, "x.toml", tmp_path)
    with pytest.raises(FleetError, match=r"group\.g\.images"):
        parse_fleet({"group": [{"name": "g"}]}, "x.toml", tmp_path)


def test_fleet_command_writes_results_summary_and_figures(tmp_path, capsys):
    path = tmp_path / "f.toml"
    path.write_text(BASE.format(duration="20s", count=2, arrival="every 5s", start="random", path='["cell"]',
                                cell="1mbit", discipline="drr", workers=1)
                    + '[sweep]\n"group.cams.count" = [1, 3]\n"receiver.workers" = [1, 2]\n')
    out = tmp_path / "out"
    assert main(["fleet", str(path), "-o", str(out)]) == 0
    assert "group.cams.count=3, receiver.workers=2: 3 senders" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["points"]) == 4
    assert {p["senders"] for p in summary["points"]} == {1, 3}
    header = (out / "results.csv").read_text().splitlines()[0]
    assert "first_picture_s" in header and "psnr_at_10s" in header
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert all(float(r["psnr_at_10s"]) > 15 for r in rows if r["complete"] == "True" and r["last_stage_s"])
    for figure in ("capacity.png", "workers.png", "failures.png", "links.png"):
        assert (out / figure).stat().st_size > 1000
    # resume keeps what was written
    before = (out / "results.csv").read_text()
    assert main(["fleet", str(path), "-o", str(out), "--resume"]) == 0
    assert (out / "results.csv").read_text() == before


def test_fleet_command_refuses_bad_files_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[[group]]\nname='g'\nimages=['astronaut']\npath=['x']\n")
    assert main(["fleet", str(path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.toml: group.g.path" in err
