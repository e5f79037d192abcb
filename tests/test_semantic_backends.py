"""Semantic encoders: the answer parser, the openai backend against a real HTTP server on loopback, the hf
backend with a tiny random vision-language model, and the CLI dispatch (sidecar stays the default)."""

import argparse
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from miscnet.core.errors import MiscError, SemanticsError
from miscnet.core.semantics import SemanticLimits
from miscnet.sender.semantic_backends import OpenAIBackend, parse_answer, question, semantics_backend

EXPECTED = [("Grey Cat", "A fluffy grey cat curled up."), ("Sofa", "A red velvet sofa."),
            ("Lamp", "A brass floor lamp.")]
CAPTION = "A grey cat sleeps on a red sofa beside a brass lamp in warm evening light."


def names_details(sem):
    return [(o.name, o.detail) for o in sem.objects]


# ============================================================================ parser

ANSWERS = {
    "json": json.dumps({"objects": [{"name": n, "detail": d} for n, d in EXPECTED], "caption": CAPTION}),
    "fenced json in prose": "Sure, here it is:\n```json\n" + json.dumps(
        {"objects": [{"Name": n, "Description": d} for n, d in EXPECTED], "overall_description": CAPTION})
        + "\n```\nLet me know if you need more.",
    "three lists": json.dumps({"names": [n for n, _ in EXPECTED], "details": [d for _, d in EXPECTED],
                               "caption": CAPTION}),
    "objects as a mapping": json.dumps({"objects": dict(EXPECTED), "caption": CAPTION}),
    "MISC line layout": "Grey Cat, Sofa, Lamp.\n" + "\n".join(d for _, d in EXPECTED) + "\n\n" + CAPTION,
    "markdown sections": "**Objects:** Grey Cat, Sofa, Lamp\n\n**Details:**\n"
        + "\n".join(f"{i}. {n}: {d}" for i, (n, d) in enumerate(EXPECTED, 1))
        + "\n\n**Overall description:** " + CAPTION,
    "heading sections with bullets": "### Objects\nObjects:\n" + "\n".join(f"- {n}" for n, _ in EXPECTED)
        + "\nDetails:\n" + "\n".join(f"- {d}" for _, d in EXPECTED) + "\nCaption:\n" + CAPTION,
    "numbered list": "Here are the objects:\n"
        + "\n".join(f"{i}. **{n}** - {d}" for i, (n, d) in enumerate(EXPECTED, 1)) + "\n\n" + CAPTION,
    "reasoning model": "<think>The user wants JSON. Objects: cat.</think>\n"
        + json.dumps({"objects": [{"name": n, "detail": d} for n, d in EXPECTED], "caption": CAPTION}),
}


@pytest.mark.parametrize("layout", list(ANSWERS))
def test_parser_reads_the_layouts_real_models_write(layout):
    sem, warnings = parse_answer(ANSWERS[layout])
    assert names_details(sem) == EXPECTED
    assert sem.caption == CAPTION
    assert warnings == []


def test_parser_boxes_in_every_scale():
    answer = {"objects": [
        {"name": "A", "detail": "a.", "box": [0.1, 0.2, 0.5, 0.6]},  # fractions
        {"name": "B", "detail": "b.", "bbox_2d": [64, 48, 320, 240]},  # pixels of the 640x480 image shown
        {"name": "C", "detail": "c.", "box": [100, 200, 500, 900]},  # 0..1000 (does not fit 640x480)
        {"name": "D", "detail": "d.", "box": [0.5, 0.5, 0.5, 0.9]},  # empty: dropped with a warning
        {"name": "E", "detail": "e.", "box": "left side"},  # not numbers: dropped
    ], "caption": "x y z."}
    sem, warnings = parse_answer(json.dumps(answer), image_size=(640, 480))
    boxes = [o.box for o in sem.objects]
    assert boxes[0] == pytest.approx((0.1, 0.2, 0.5, 0.6))
    assert boxes[1] == pytest.approx((0.1, 0.1, 0.5, 0.5))
    assert boxes[2] == pytest.approx((0.1, 0.2, 0.5, 0.9))
    assert boxes[3] is None and boxes[4] is None
    assert len(warnings) == 2 and "D" in warnings[0] and "E" in warnings[1]


def test_parser_qwen_box_tags_are_per_mille():
    text = ("Objects: cat, sofa\nDetails:\n1. cat: a grey cat <|box_start|>(100,200),(300,400)<|box_end|>\n"
            "2. sofa: a red sofa\nCaption: A cat on a sofa.")
    sem, _ = parse_answer(text, image_size=(640, 480))  # (300, 400) would fit as pixels: the tag decides
    assert sem.objects[0].box == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert sem.objects[0].detail == "a grey cat" and sem.objects[1].box is None


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("I cannot help with that.", "no JSON object"),
    ("Objects: cat, dog\nDetails:\n1. a cat\nCaption: two pets", "2 object names but 1 detail"),
    (json.dumps({"objects": [{"name": "cat", "detail": "a cat"}]}), "no JSON object"),
    ("\x10\x14 box_; ca\ufffd", "no JSON object"),
])
def test_parser_fails_clearly_in_one_line(text, reason):
    with pytest.raises(SemanticsError) as e:
        parse_answer(text, source="test model")
    msg = str(e.value)
    assert reason in msg and "\n" not in msg and msg.startswith("test model:")


def test_question_asks_for_misc_lists_with_the_configured_limits():
    q = question(SemanticLimits(max_objects=4, max_name_words=2, max_detail_words=12, caption_words=40))
    for phrase in ('"objects"', '"name"', '"detail"', '"caption"', '"box"', "4 most striking", "at most 2 words",
                   "at most 12 words", "about 40 words"):
        assert phrase in q
    assert '"box"' not in question(boxes=False)


# ============================================================================ openai on loopback


class FakeAPI:
    """An HTTP server on 127.0.0.1 that answers /v1/chat/completions like the API, from a script."""

    def __init__(self, script):
        self.script = list(script)  # each: (status, body dict or str, headers, delay)
        self.requests = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                api.requests.append({"path": self.path, "headers": dict(self.headers),
                                     "body": json.loads(self.rfile.read(length))})
                status, body, headers, delay = api.script.pop(0) if len(api.script) > 1 else api.script[0]
                if delay:
                    time.sleep(delay)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def completion(content):
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "test-vlm",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


OK = (200, completion(ANSWERS["json"]), None, 0)
IMAGE = np.random.default_rng(1).integers(0, 255, (300, 1500, 3), dtype=np.uint8)


def backend(url, **kw):
    kw.setdefault("model", "test-vlm")
    kw.setdefault("backoff", 0.01)
    return OpenAIBackend(base_url=url, **kw)


def test_openai_request_and_answer():
    with FakeAPI([OK]) as api:
        sem, warnings = backend(api.url, api_key="sk-test", max_side=600).describe(IMAGE)
    assert names_details(sem) == EXPECTED and sem.caption == CAPTION and warnings == []
    (req,) = api.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "test-vlm" and body["temperature"] == 0 and body["max_tokens"] == 600
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": question()}
    url = image["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (600, 120)  # long side capped, aspect kept


def test_openai_settings_from_the_environment(monkeypatch):
    with FakeAPI([(200, completion([{"type": "text", "text": ANSWERS["numbered list"]}]), None, 0)]) as api:
        monkeypatch.setenv("OPENAI_BASE_URL", api.url + "/")
        monkeypatch.setenv("MISCNET_LMM_MODEL", "env-model")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        sem, _ = semantics_backend("openai", backoff=0.01).describe(IMAGE)
    assert names_details(sem) == EXPECTED  # content given as a list of parts
    assert api.requests[0]["body"]["model"] == "env-model"
    assert api.requests[0]["headers"]["Authorization"] == "Bearer sk-env"


def test_openai_no_key_sent_to_a_local_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeAPI([OK]) as api:
        backend(api.url).describe(IMAGE)
    assert "Authorization" not in api.requests[0]["headers"]


def test_openai_retries_429_and_5xx_then_succeeds():
    script = [(503, {"error": {"message": "overloaded"}}, None, 0),
              (429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}, 0), OK]
    with FakeAPI(script) as api:
        sem, _ = backend(api.url, retries=3).describe(IMAGE)
    assert len(api.requests) == 3 and len(sem.objects) == 3


def test_openai_adapts_to_models_that_refuse_max_tokens_and_temperature():
    script = [(400, {"error": {"message": "Unsupported parameter: 'max_tokens'. Use 'max_completion_tokens'."}},
               None, 0),
              (400, {"error": {"message": "Unsupported value: 'temperature' does not support 0"}}, None, 0), OK]
    with FakeAPI(script) as api:
        sem, _ = backend(api.url, retries=0).describe(IMAGE)
    assert len(sem.objects) == 3 and len(api.requests) == 3
    last = api.requests[-1]["body"]
    assert last["max_completion_tokens"] == 600 and "max_tokens" not in last and "temperature" not in last


def test_openai_gives_up_after_the_retries():
    with FakeAPI([(500, {"error": {"message": "boom"}}, None, 0)]) as api:
        with pytest.raises(MiscError, match=r"HTTP 500: boom \(after 3 attempts"):
            backend(api.url, retries=2).describe(IMAGE)
    assert len(api.requests) == 3


def test_openai_client_errors_are_not_retried():
    with FakeAPI([(401, {"error": {"message": "Incorrect API key"}}, None, 0)]) as api:
        with pytest.raises(MiscError, match="HTTP 401: Incorrect API key.*OPENAI_API_KEY"):
            backend(api.url, retries=3).describe(IMAGE)
    assert len(api.requests) == 1


def test_openai_timeout():
    # the server answers after 5 s, well after the 0.2 s timeout: only the timeout path gives this error
    with FakeAPI([(200, completion(ANSWERS["json"]), None, 5.0)]) as api:
        with pytest.raises(MiscError, match=r"no answer within 0.2 s \(after 2 attempts"):
            backend(api.url, timeout=0.2, retries=1).describe(IMAGE)


def test_openai_bad_answers():
    with FakeAPI([(200, "<html>proxy</html>", None, 0)]) as api:
        with pytest.raises(MiscError, match="not JSON"):
            backend(api.url).describe(IMAGE)
    with FakeAPI([(200, completion("I see a cat."), None, 0)]) as api:
        with pytest.raises(SemanticsError, match="could not read MISC's three lists.*I see a cat"):
            backend(api.url).describe(IMAGE)
    with FakeAPI([(200, {"choices": []}, None, 0)]) as api:
        with pytest.raises(MiscError, match="no choices"):
            backend(api.url).describe(IMAGE)


def test_openai_configuration_errors(monkeypatch):
    monkeypatch.delenv("MISCNET_LMM_MODEL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MiscError, match="needs a model.*--lmm-model"):
        OpenAIBackend()
    with pytest.raises(MiscError, match="needs a key.*OPENAI_API_KEY"):
        OpenAIBackend(model="gpt-4o")
    with pytest.raises(MiscError, match="not an http"):
        OpenAIBackend(model="m", base_url="localhost:8000")
    # nothing listens on a port we just closed
    srv = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = srv.server_address[1]
    srv.server_close()
    with pytest.raises(MiscError, match="cannot connect"):
        backend(f"http://127.0.0.1:{port}/v1", retries=0).describe(IMAGE)


# ============================================================================ CLI dispatch


def parser():
    from miscnet.cli.models import add_map_model_options, add_semantics_backend_options

    p = argparse.ArgumentParser()
    p.add_argument("image")
    p.add_argument("--semantics")
    g = p.add_argument_group("encoder")
    add_semantics_backend_options(g)
    add_map_model_options(g)
    return p


def config(*argv):
    """The SemanticsConfig the CLI's options make."""
    from miscnet.cli.models import semantics_config

    return semantics_config(parser().parse_args(list(argv)))


def test_semantics_for_sidecar_default_keeps_todays_behaviour(foreign_image):
    from miscnet.core.config import SemanticsConfig
    from miscnet.sender.semantics_source import semantics_for

    path, side = foreign_image
    args = parser().parse_args([str(path)])
    assert args.semantics_backend == "sidecar"
    cfg = config(str(path))
    assert cfg == SemanticsConfig()  # the CLI's defaults are the dataclass's
    sem, warnings = semantics_for(cfg, None, path)
    assert [o.name for o in sem.objects] == ["Red Box", "Gradient Sky"]
    sem2, _ = semantics_for(cfg, None, "sample:astronaut")
    from miscnet.core.samples import sample_image_path

    sem3, _ = semantics_for(cfg, None, sample_image_path("astronaut"))
    assert sem2 == sem3 and sem2.objects
    side.unlink()
    with pytest.raises(MiscError, match="no semantics for .*--semantics FILE"):
        semantics_for(cfg, None, path)


def test_semantics_for_openai_and_save(tmp_path):
    from miscnet.sender.semantics_source import semantics_for

    with FakeAPI([OK]) as api:
        cfg = config("img.png", "--semantics-backend", "openai", "--lmm-endpoint", api.url,
                     "--lmm-model", "m", "--save-semantics", str(tmp_path / "{stem}.json"))
        sem, warnings = semantics_for(cfg, IMAGE, "img.png")
    assert names_details(sem) == EXPECTED
    saved = json.loads((tmp_path / "img.json").read_text())
    assert saved["caption"] == CAPTION and [o["name"] for o in saved["objects"]] == [n for n, _ in EXPECTED]
    with pytest.raises(MiscError, match="cannot be combined"):
        semantics_for(config("img.png", "--semantics-backend", "openai", "--semantics", "x.json"), IMAGE, "img.png")


def test_semantics_config_checks_itself():
    from miscnet.core.config import SemanticsConfig

    for bad, match in [({"backend": "magic"}, "unknown semantics backend"), ({"lmm_timeout": 0}, "lmm timeout"),
                       ({"lmm_retries": -1}, "lmm retries"), ({"lmm_max_tokens": 0}, "max tokens"),
                       ({"backend": "hf", "sidecar": "x.json"}, "cannot be combined")]:
        with pytest.raises(MiscError, match=match) as e:
            SemanticsConfig(**bad)
        assert "\n" not in str(e.value)
    assert "secret" not in repr(SemanticsConfig(backend="openai", lmm_api_key="secret"))


# ============================================================================ hf with a tiny VLM


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    from miscnet.experiments.models import write_tiny_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and steady when the CPU is shared
    yield write_tiny_models(tmp_path_factory.mktemp("tiny-vlm"), roles=("vlm",))["vlm"]
    torch.set_num_threads(threads)


def test_hf_backend_runs_the_tiny_model_offline(tiny_vlm):
    be = semantics_backend("hf", model=str(tiny_vlm), max_new_tokens=8, device="cpu")
    processor, model, _ = be._loaded()
    assert len(processor.tokenizer) == model.config.text_config.vocab_size  # the offline tokenizer loaded
    text, size = be.ask(IMAGE)
    assert isinstance(text, str) and size == (1024, 205)
    assert be.ask(IMAGE)[0] == text  # greedy decoding: deterministic
    with pytest.raises(SemanticsError, match="hf model vlm: could not read"):
        be.describe(IMAGE)  # random weights say nothing readable; the error says so in one line


def test_hf_backend_decodes_and_parses_what_the_model_generates(tiny_vlm, monkeypatch):
    be = semantics_backend("hf", model=str(tiny_vlm), device="cpu")
    processor, model, _ = be._loaded()
    answer = ANSWERS["MISC line layout"]
    real_generate = model.generate

    def scripted_generate(**inputs):
        import torch

        ids = processor.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        real_generate(**{**inputs, "max_new_tokens": 1})  # the real call path still runs
        return torch.cat([inputs["input_ids"], ids], dim=1)

    monkeypatch.setattr(model, "generate", scripted_generate)
    sem, warnings = be.describe(IMAGE)
    assert names_details(sem) == EXPECTED and sem.caption == CAPTION


def test_semantics_for_hf(tiny_vlm):
    from miscnet.sender.semantics_source import semantics_for

    cfg = config("img.png", "--semantics-backend", "hf", "--vlm-model", str(tiny_vlm), "--lmm-max-tokens", "4",
                 "--model-device", "cpu")
    assert (cfg.backend, cfg.vlm_model, cfg.lmm_max_tokens, cfg.device) == ("hf", str(tiny_vlm), 4, "cpu")
    with pytest.raises(SemanticsError, match="hf model vlm"):
        semantics_for(cfg, IMAGE, "img.png")


def test_hf_backend_missing_model_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MISCNET_VLM_MODEL", raising=False)
    monkeypatch.delenv("MISCNET_MODELS_DIR", raising=False)
    with pytest.raises(MiscError, match="no vlm model configured: give --vlm-model"):
        semantics_backend("hf")
    with pytest.raises(MiscError, match=f"{tmp_path / 'nope'} does not exist"):
        semantics_backend("hf", model=str(tmp_path / "nope"))
