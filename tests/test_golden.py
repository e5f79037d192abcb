"""The same inputs and seed give the same bytes as the committed golden outputs (see golden/README.md)."""

import contextlib
import io
from pathlib import Path

import pytest

from miscnet.cli.main import main

GOLDEN = Path(__file__).resolve().parent / "golden"

ENCODES = {
    "astronaut-default.misc": ["sample:astronaut"],
    "coffee-block-3levels-bpp0.04.misc": ["sample:coffee", "--bpp", "0.04", "--pixel", "block", "--levels", "3"],
    "rocket-webp-grid16.misc": ["sample:rocket", "--pixel", "webp", "--grid", "16"],
}
SIMULATIONS = {
    "simulate-hybrid-gemodel-seed1.json": ["sample:astronaut", "sample:coffee", "--rate", "64kbit", "--delay",
                                           "40ms", "--loss", "gemodel 1% 30% 70% 0.1%", "--protect", "hybrid",
                                           "--seed", "1"],
    "simulate-fec-queue-seed2.json": ["sample:chelsea", "--rate", "32kbit", "--queue", "3000", "--protect", "fec",
                                      "--seed", "2"],
}


@pytest.mark.parametrize("name", sorted(ENCODES))
def test_encode_matches_golden_bytes(name, tmp_path):
    out = tmp_path / name
    assert main(["encode", *ENCODES[name], "-o", str(out)]) == 0
    assert out.read_bytes() == (GOLDEN / name).read_bytes(), f"{name}: the encoder's bytes changed"


@pytest.mark.parametrize("name", sorted(SIMULATIONS))
def test_simulate_json_matches_golden_bytes(name):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["simulate", *SIMULATIONS[name], "--json"]) == 0
    assert buf.getvalue().encode() == (GOLDEN / name).read_bytes(), f"{name}: the simulator's output changed"
