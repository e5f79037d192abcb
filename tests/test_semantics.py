"""Semantic layer: readers, limits, and the text codec (round trips, corrupt input, compression)."""

import csv
import hashlib
import json
from pathlib import Path

import brotli
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miscnet.core import semantic_codec as sc
from miscnet.core.errors import BitstreamError, SemanticsError
from miscnet.core.semantics import (
    SemanticLimits,
    SemanticObject,
    Semantics,
    check_limits,
    load_semantics,
    semantics_from_dict,
    semantics_to_json,
)
from miscnet.experiments import bench_semantic
from miscnet.experiments.bench_semantic import MISC_EXAMPLE_CSV
from miscnet.v1 import bitstream_pb2 as pb

SHARED_EXAMPLE = Path("/work/shared/misc-example/GPT-example.csv")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _warm_model():
    sc._lexicon()  # built once (about 0.4 s); keeps it out of per-example timings


@pytest.fixture
def example_csv(tmp_path) -> Path:
    p = tmp_path / "GPT-example.csv"
    p.write_bytes(MISC_EXAMPLE_CSV.encode("utf-8"))
    return p


@pytest.fixture
def example(example_csv) -> Semantics:
    return load_semantics(example_csv, "example.png")[0]


def _params(n: int, version: int = sc.MODEL_VERSION) -> pb.SemanticParams:
    return pb.SemanticParams(model_version=version, objects=n)


def _decode_or_error(codec: int, n: int, payload: bytes) -> None:
    """Decoding anything must give Semantics or BitstreamError, nothing else."""
    try:
        sem = sc.decode_semantic_layer(codec, _params(n), payload)
    except BitstreamError as e:
        assert "\n" not in str(e)
    else:
        assert len(sem.objects) == n and sem.text_chars() <= sc.MAX_TEXT_CHARS


# --------------------------------------------------------------------------- readers


def test_embedded_example_matches_shared_copy():
    if not SHARED_EXAMPLE.is_file():
        pytest.skip("no shared copy of MISC's example here")
    assert SHARED_EXAMPLE.read_bytes() == MISC_EXAMPLE_CSV.encode("utf-8")


def test_csv_example_parses(example_csv):
    sem, warnings = load_semantics(example_csv, "some/dir/example.png")
    assert [o.name for o in sem.objects] == ["Astronaut Helmet", "Blue Hair", "Orange Paint Splatter"]
    assert sem.objects[0].detail == "A white astronaut helmet with reflections."
    assert sem.objects[2].detail == "Bright orange paint splatter effects surrounding the helmet."
    assert all(o.box is None for o in sem.objects)
    assert sem.caption.startswith("The most striking object")
    assert sem.caption.endswith("abstract play of color and form.")
    assert sem.text_chars() == 46 + 149 + 486  # names + stripped details + caption
    assert warnings == []
    # the only data row is taken when no image is named
    assert load_semantics(example_csv)[0] == sem


def test_csv_row_chosen_by_image_name(tmp_path):
    p = tmp_path / "two.csv"
    rows = [["name", "prompt"],
            ["a.png", "Cat.\nA grey cat.\n\nA grey cat on a mat."],
            ["b.png", "Dog, Ball.\nA brown dog.\nA red ball.\n\nA dog chases a ball."],
            ["", ""]]
    with p.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    sem = load_semantics(p, "/x/y/b.png")[0]
    assert [o.name for o in sem.objects] == ["Dog", "Ball"] and sem.caption == "A dog chases a ball."
    with pytest.raises(SemanticsError, match="two.csv.*name the image"):
        load_semantics(p)
    with pytest.raises(SemanticsError, match="two.csv.*no row for image 'c.png'"):
        load_semantics(p, "c.png")


def test_csv_single_row_needs_matching_name(example_csv):
    with pytest.raises(SemanticsError, match="GPT-example.csv.*no row for image"):
        load_semantics(example_csv, "other.png")


def test_json_round_trip(tmp_path):
    sem = Semantics(
        objects=(SemanticObject("Red Box", "A flat red rectangle.", (0.25, 0.0, 0.75, 1.0)),
                 SemanticObject("Sky", "Blue, with \"quotes\" and ünïcode ☃.", None)),
        caption="Line one.\nLine two.",
    )
    d = semantics_to_json(sem)
    assert "box" not in d["objects"][1]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(d))
    back, warnings = load_semantics(p)
    assert back == sem
    assert semantics_from_dict(json.loads(json.dumps(d)), "x") == sem
    assert warnings == []


def test_objects_list_becomes_tuple():
    sem = Semantics(objects=[SemanticObject("A", "b", [0, 0, 1, 1])], caption="c")  # type: ignore[arg-type]
    assert isinstance(sem.objects, tuple) and hash(sem) and sem.objects[0].box == (0.0, 0.0, 1.0, 1.0)


def test_constructors_validate():
    with pytest.raises(SemanticsError):
        SemanticObject(3, "b")  # type: ignore[arg-type]
    with pytest.raises(SemanticsError):
        SemanticObject("a", "b", (0.5, 0.0, 0.2, 1.0))
    with pytest.raises(SemanticsError):
        Semantics(("not an object",), "c")  # type: ignore[arg-type]
    with pytest.raises(SemanticsError):
        Semantics((), None)  # type: ignore[arg-type]


GOOD = {"objects": [{"name": "Cat", "detail": "A cat.", "box": [0, 0, 1, 1]}], "caption": "A cat."}

MALFORMED_JSON = {
    "syntax": '{"objects": [}',
    "not_object": "[1, 2]",
    "unknown_top_key": json.dumps({**GOOD, "colour": "red"}),
    "unknown_object_key": json.dumps({**GOOD, "objects": [{"name": "a", "detail": "b", "size": 3}]}),
    "missing_caption": json.dumps({"objects": []}),
    "missing_detail": json.dumps({"objects": [{"name": "a"}], "caption": ""}),
    "objects_not_list": json.dumps({"objects": {"name": "a"}, "caption": ""}),
    "object_not_dict": json.dumps({"objects": ["a"], "caption": ""}),
    "name_not_string": json.dumps({"objects": [{"name": 3, "detail": "b"}], "caption": ""}),
    "caption_not_string": json.dumps({"objects": [], "caption": None}),
    "box_short": json.dumps({**GOOD, "objects": [{"name": "a", "detail": "b", "box": [0, 0, 1]}]}),
    "box_range": json.dumps({**GOOD, "objects": [{"name": "a", "detail": "b", "box": [0, 0, 1.5, 1]}]}),
    "box_order": json.dumps({**GOOD, "objects": [{"name": "a", "detail": "b", "box": [0.5, 0, 0.5, 1]}]}),
    "box_nan": '{"objects": [{"name": "a", "detail": "b", "box": [0, 0, NaN, 1]}], "caption": ""}',
    "box_bool": json.dumps({**GOOD, "objects": [{"name": "a", "detail": "b", "box": [0, 0, True, 1]}]}),
    "box_string": json.dumps({**GOOD, "objects": [{"name": "a", "detail": "b", "box": "0 0 1 1"}]}),
    "lone_surrogate": '{"objects": [], "caption": "bad \\ud800 text"}',
    "empty_name": json.dumps({"objects": [{"name": "  ", "detail": "b"}], "caption": ""}),
    "deep_nesting": "[" * 100000,
    "empty_file": "",
    "duplicate_key": '{"objects": [], "caption": "a", "caption": "b"}',
    "huge_int": '{"objects": [{"name": "a", "detail": "b", "box": [0, 0, 1, ' + "9" * 5000 + "]}], "
                '"caption": ""}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED_JSON))
def test_malformed_json_names_the_file(tmp_path, case):
    p = tmp_path / f"bad_{case}.json"
    p.write_text(MALFORMED_JSON[case])
    with pytest.raises(SemanticsError) as e:
        load_semantics(p)
    msg = str(e.value)
    assert p.name in msg and "\n" not in msg
    if case.startswith("unknown"):
        assert ("'colour'" if case == "unknown_top_key" else "'size'") in msg


MALFORMED_CSV = {
    "bad_header": "image,text\na.png,x\n",
    "no_rows": "name,prompt\n,\n,\n",
    "names_details_mismatch": 'name,prompt\na.png,"A, B.\nOnly one detail.\n\nCaption."\n',
    "empty_name": 'name,prompt\na.png,"A, , B.\nd1\nd2\nd3\n\nCaption."\n',
    "empty_prompt": 'name,prompt\na.png,"   "\n',
    "three_columns": 'name,prompt\na.png,"A.\nd\n\nc",extra\n',
    "bad_quoting": 'name,prompt\na.png,"A.\nd\n\nc"x"\n',
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CSV))
def test_malformed_csv_names_the_file(tmp_path, case):
    p = tmp_path / f"bad_{case}.csv"
    p.write_text(MALFORMED_CSV[case], newline="")
    with pytest.raises(SemanticsError) as e:
        load_semantics(p, "a.png")
    assert p.name in str(e.value) and "\n" not in str(e.value)


def test_unreadable_files(tmp_path):
    cases = []
    big = tmp_path / "big.json"
    big.write_bytes(b" " * ((1 << 20) + 1))
    cases.append(big)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"objects": [], "caption": "caf\xe9"}')
    cases.append(latin)
    cases.append(tmp_path / "missing.json")
    other = tmp_path / "sidecar.txt"
    other.write_text("{}")
    cases.append(other)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    cases.append(folder)
    for p in cases:
        with pytest.raises(SemanticsError) as e:
            load_semantics(p)
        assert p.name in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- limits


def test_limits_warn_then_strict_errors():
    sem = Semantics(
        objects=tuple(SemanticObject(f"Big Old Red Thing {i}", "one two three four five six seven eight nine "
                                     "ten eleven") for i in range(4)),
        caption="word " * 130,
    )
    warnings = check_limits(sem, SemanticLimits())
    text = " | ".join(warnings)
    assert "4 objects" in text and "name" in text
    assert "detail has 11 words" in text and "caption has 130" in text
    assert "repeats" not in text
    with pytest.raises(SemanticsError, match="strict"):
        check_limits(sem, SemanticLimits(strict=True))
    assert check_limits(sem, SemanticLimits(max_objects=4, max_name_words=5, max_detail_words=11,
                                            caption_max_words=130)) == []


def test_limits_hard_errors():
    ok = Semantics((SemanticObject("Cat", "A cat."),), "x" * 100)
    assert check_limits(ok, SemanticLimits(max_text_bytes=200)) == []
    with pytest.raises(SemanticsError, match="over the limit of 50"):
        check_limits(ok, SemanticLimits(max_text_bytes=50))  # not strict, still an error
    with pytest.raises(SemanticsError, match="empty name"):
        check_limits(Semantics((SemanticObject("", "d"),), "c"))
    with pytest.raises(SemanticsError, match="lone surrogate"):
        check_limits(Semantics((), "bad \ud800"))
    warnings = check_limits(Semantics((SemanticObject("Cat", ""), SemanticObject("cat", "x")), ""))
    assert any("empty detail" in w for w in warnings) and any("repeats" in w for w in warnings)
    assert any("caption is empty" in w for w in warnings)


def test_load_applies_limits(tmp_path):
    p = tmp_path / "long.json"
    p.write_text(json.dumps({"objects": [{"name": "A B C D", "detail": "d"}], "caption": "c"}))
    sem, warnings = load_semantics(p)
    assert len(warnings) == 1 and "long.json" in warnings[0] and "4 words" in warnings[0]
    with pytest.raises(SemanticsError, match="long.json"):
        load_semantics(p, limits=SemanticLimits(strict=True))


# --------------------------------------------------------------------------- codec


def test_codec_example_ratio_and_round_trip(example):
    codec, params, payload = sc.encode_semantic_layer(example)
    assert codec == pb.CODEC_TEXT_WORDMODEL and params.model_version == sc.MODEL_VERSION
    assert params.objects == 3
    back = sc.decode_semantic_layer(codec, params, payload)
    assert back.texts() == example.texts() and all(o.box is None for o in back.objects)
    raw = sc.misc_raw_bytes(example)
    assert raw == example.text_chars() == 681
    assert len(payload) / raw <= 0.35
    assert len(payload) / bench_semantic.MISC_EXAMPLE_CHARS <= 0.35  # also against MISC's own 638
    assert len(payload) < len(brotli.compress("\n".join(example.texts()).encode(), quality=11))


def test_codec_boxes_are_not_coded(example):
    boxed = Semantics(tuple(SemanticObject(o.name, o.detail, (0.1, 0.1, 0.9, 0.9)) for o in example.objects),
                      example.caption)
    assert sc.encode_semantic_layer(boxed) == sc.encode_semantic_layer(example)


def test_model_data_pinned(example):
    # The model is part of the format: its data and its output on the example must not drift
    # without a new MODEL_VERSION.
    assert sc._lexicon().checksum == sc.MODEL_CHECKSUM
    payload = sc.encode_candidates(example)[pb.CODEC_TEXT_WORDMODEL]
    assert hashlib.sha256(payload).hexdigest()[:16] == GOLDEN_EXAMPLE_SHA256


GOLDEN_EXAMPLE_SHA256 = "a854920cfaff857d"  # first 16 hex digits; a change needs a new MODEL_VERSION


def test_codec_tiny_and_empty():
    for sem in (Semantics((), ""), Semantics((SemanticObject("A", ""),), ""), Semantics((), " "),
                Semantics((SemanticObject("x", "y"),), "\n\n")):
        codec, params, payload = sc.encode_semantic_layer(sem)
        assert sc.decode_semantic_layer(codec, params, payload) == sem
        for c, p in sc.encode_candidates(sem).items():
            assert sc.decode_semantic_layer(c, params, p).texts() == sem.texts()


def test_codec_refuses_unencodable():
    with pytest.raises(SemanticsError):
        sc.encode_semantic_layer(Semantics((), "x" * (sc.MAX_TEXT_CHARS + 1)))
    with pytest.raises(SemanticsError):
        sc.encode_semantic_layer(Semantics((), "bad \udc80"))
    with pytest.raises(SemanticsError):
        sc.encode_semantic_layer(Semantics(tuple(SemanticObject("a", "b") for _ in range(65)), ""))


_texts = st.text(max_size=60)
_WORDS = ["the", "a", "Cat", "helmet", "astronaut", "qzxv", "blorptastic", "don", "s", "iPhone", "NASA",
          "I", "x", "'", "\u2019", ",", ".", "\n", "  ", " ", "\u00e9", "3D", "2024", "\u2014", "(", ")", '"',
          "...", "!?", "\\", "\\n", "\t", "\u4e00\u4e8c", "\U0001f600", "ok.", "Ok", "OK"]
_wordy = st.lists(st.sampled_from(_WORDS), max_size=30).map(
    lambda ws: "".join(w if i % 3 else w + " " for i, w in enumerate(ws)))


@FAST
@given(st.lists(st.tuples(_texts, _texts), max_size=4), st.text(max_size=200))
def test_codec_round_trip_any_text(objs, caption):
    sem = Semantics(tuple(SemanticObject(a, b) for a, b in objs), caption)
    codec, params, payload = sc.encode_semantic_layer(sem)
    assert sc.decode_semantic_layer(codec, params, payload) == sem
    cands = sc.encode_candidates(sem)
    assert pb.CODEC_TEXT_WORDMODEL in cands  # the word model codes any text, not just English
    assert len(payload) <= len(cands[pb.CODEC_TEXT_BROTLI])
    for c, p in cands.items():
        assert sc.decode_semantic_layer(c, params, p).texts() == sem.texts()


@FAST
@given(st.lists(st.tuples(_wordy, _wordy), max_size=3), _wordy)
def test_codec_round_trip_wordy_text(objs, caption):
    sem = Semantics(tuple(SemanticObject(a, b) for a, b in objs), caption)
    cands = sc.encode_candidates(sem)
    assert pb.CODEC_TEXT_WORDMODEL in cands
    params = _params(len(objs))
    for c, p in cands.items():
        assert sc.decode_semantic_layer(c, params, p).texts() == sem.texts()
    codec, _, payload = sc.encode_semantic_layer(sem)
    assert len(payload) == min(len(p) for p in cands.values())


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([pb.CODEC_TEXT_RAW, pb.CODEC_TEXT_BROTLI, pb.CODEC_TEXT_WORDMODEL]),
       st.integers(0, 4), st.binary(max_size=300))
def test_codec_garbage_payloads(codec, n, data):
    _decode_or_error(codec, n, data)


def test_codec_truncated_and_flipped(example):
    for codec, payload in sc.encode_candidates(example).items():
        for cut in range(len(payload)):
            _decode_or_error(codec, 3, payload[:cut])
        for i in range(0, len(payload) * 8, 3):
            flipped = bytearray(payload)
            flipped[i // 8] ^= 1 << (i % 8)
            _decode_or_error(codec, 3, bytes(flipped))
        _decode_or_error(codec, 3, payload + b"\0")
        _decode_or_error(codec, 3, payload + b"\x01\x02")
        for n in (0, 2, 4, 64):
            _decode_or_error(codec, n, payload)


def test_codec_trailing_bytes_rejected(example):
    payload = sc.encode_candidates(example)[pb.CODEC_TEXT_WORDMODEL]
    with pytest.raises(BitstreamError):
        sc.decode_semantic_layer(pb.CODEC_TEXT_WORDMODEL, _params(3), payload + b"\x01\x02")


def test_codec_refuses_unknown_versions_and_codecs(example):
    codec, params, payload = sc.encode_semantic_layer(example)
    with pytest.raises(BitstreamError, match="version"):
        sc.decode_semantic_layer(codec, _params(3, sc.MODEL_VERSION + 1), payload)
    with pytest.raises(BitstreamError, match="codec"):
        sc.decode_semantic_layer(pb.CODEC_MASK_BITPACK, params, payload)
    with pytest.raises(BitstreamError, match="objects"):
        sc.decode_semantic_layer(codec, _params(10**6), payload)


def test_codec_bombs_are_bounded():
    bomb = brotli.compress(b"a" * (9 * sc.MAX_TEXT_CHARS), quality=11)
    with pytest.raises(BitstreamError):
        sc.decode_semantic_layer(pb.CODEC_TEXT_BROTLI, _params(0), bomb)
    for data in (b"", b"\0" * 64, b"\xff" * 64):  # junk ends in an error or a bounded result
        _decode_or_error(pb.CODEC_TEXT_WORDMODEL, 4, data)


# --------------------------------------------------------------------------- benchmark


def test_bench_runs_and_passes(capsys):
    assert bench_semantic.main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["source"].startswith("MISC") and rows[0]["ratio"] <= 0.35
    for r in rows:
        assert r["payload_bytes"] <= r["brotli_bytes"]
