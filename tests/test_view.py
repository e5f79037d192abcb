"""The live web view in a real browser: headless Chromium (Debian's ``chromium``; .ci/run installs it) opens the
page of a ``miscnet view --watch`` process while a sender streams two samples to a live receiver, and the
DOM, the page's own timestamps and a screenshot show each image's stages appearing in order; then the
receiver stops and the page says so. Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4), with no extra library.

``pytest tests/test_view.py -s`` prints the time from each stage's decode (the receiver's ``logged_at``)
to its picture being painted in the page, and where the screenshot is.
"""

import base64
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from live_nodes import ROOT, encoded_samples, wait_for
from PIL import Image

from miscnet.channel.grpc_util import TlsFiles
from miscnet.channel.stats import fetch_stats
from miscnet.channel.transport import TransportConfig
from miscnet.sender.node import SenderOptions, send_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "view-test-token"
VIEWPORT = (1280, 2400)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe."""

    def __init__(self, profile_dir):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's ends at 10 and up, so that putting them at 3 and 4 cannot overwrite one with the other
        for name in ("to_child_r", "from_child_w"):
            fd = locals()[name]
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            if name == "to_child_r":
                to_child_r = high
            else:
                from_child_w = high
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--mute-audio", f"--user-data-dir={profile_dir}", "--remote-debugging-pipe",
                "about:blank"]
        # the protocol's descriptors are 3 (commands in) and 4 (replies out): bash puts them there (dash: fds 0-9)
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_child_r} 4>&{from_child_w}', "bash", *args],
                                     pass_fds=(to_child_r, from_child_w), stdout=subprocess.DEVNULL,
                                     stderr=(profile_dir.parent / "chromium.log").open("wb"))
        os.close(to_child_r)
        os.close(from_child_w)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=VIEWPORT[0], height=VIEWPORT[1],
                  deviceScaleFactor=1, mobile=False)

    def _read(self):
        buf = b""
        while True:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
        with self._cond:
            self._replies[-1] = {"error": {"message": "chromium closed its pipe"}}
            self._cond.notify_all()

    def call(self, method, session=False, timeout=60.0, **params):
        with self._cond:
            self._next += 1
            n = self._next
        message = {"id": n, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        with self._cond:
            assert self._cond.wait_for(lambda: n in self._replies or -1 in self._replies, timeout), method
            reply = self._replies.pop(n, None) or self._replies[-1]
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def navigate(self, url):
        self.call("Page.navigate", session=True, url=url)

    def screenshot(self) -> np.ndarray:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def _miscnet(*args, log):
    return subprocess.Popen([sys.executable, "-m", "miscnet", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _port(path, proc, timeout=60.0):
    assert wait_for(lambda: path.exists() and path.read_text().strip() or proc.poll() is not None, timeout)
    assert proc.poll() is None, "the process exited before it listened"
    return int(path.read_text())


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _watchers(port):
    reply = fetch_stats(f"127.0.0.1:{port}", TlsFiles(), token=TOKEN)
    return next(m.value for m in reply.metrics if m.name == "watchers")


TILES = """[...document.querySelectorAll('article.image')].map(a => ({
  image: a.dataset.image, state: a.querySelector('.state').textContent,
  tiles: [...a.querySelectorAll('figure.stage')].map(f => ({...f.dataset,
     rect: (f.querySelector('img') || f.firstElementChild).getBoundingClientRect().toJSON(),
     natural: f.querySelector('img') ? [f.querySelector('img').naturalWidth, f.querySelector('img').naturalHeight]
                                      : null}))}))"""


def _content_box(rect, natural):
    """The picture's box inside its tile (object-fit: contain: scaled to fit, centred)."""
    w, h = natural
    scale = min(rect["width"] / w, rect["height"] / h)
    cw, ch = w * scale, h * scale
    x0, y0 = rect["x"] + (rect["width"] - cw) / 2, rect["y"] + (rect["height"] - ch) / 2
    return int(round(x0)) + 1, int(round(y0)) + 1, int(cw) - 2, int(ch) - 2  # a pixel in: no anti-aliased edge


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_page_shows_each_stage_in_order_during_a_live_transfer(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    rx_log, view_log = (logs / "receiver.log").open("w"), (logs / "view.log").open("w")
    receiver = _miscnet("receiver", "--listen", "127.0.0.1:0", "--port-file", str(logs / "rx.port"), "--out",
                        str(tmp_path / "rx"), "--policy", "fifo", "--token", TOKEN, log=rx_log)
    view = browser = None
    try:
        rx_port = _port(logs / "rx.port", receiver)
        view = _miscnet("view", "--watch", f"127.0.0.1:{rx_port}", "--web", "127.0.0.1:0", "--web-port-file",
                        str(logs / "web.port"), "--token", TOKEN, log=view_log)
        web = f"http://127.0.0.1:{_port(logs / 'web.port', view)}/"
        with pytest.raises(urllib.error.HTTPError) as refused:  # the receiver's token guards the page too
            urllib.request.urlopen(web, timeout=10)
        assert refused.value.code == 401

        browser = Chromium(tmp_path / "profile")
        browser.navigate(f"{web}?token={TOKEN}")
        assert wait_for(lambda: browser.evaluate("document.getElementById('status')?.dataset.state") == "connected",
                        30), browser.evaluate("document.getElementById('status')?.textContent")

        # the view's Watch call is open at the receiver (its gauge), so no event can come before it
        assert wait_for(lambda: _watchers(rx_port) == 1, 30)
        names = ["chelsea", "coffee"]
        items = encoded_samples(names, 900)
        results = send_images(items, SenderOptions(target=f"127.0.0.1:{rx_port}", token=TOKEN,
                                                   transport=TransportConfig(mode="arq")))
        assert all(r.delivered for r in results)
        layer_counts = {name: len(encoded.layers) - 1 for name, encoded in items}  # semantic + map: one stage

        def settled():
            cards = {c["image"]: c for c in browser.evaluate(TILES)}
            return all(name in cards and len(cards[name]["tiles"]) == layer_counts[name]
                       and all("shownAt" in t for t in cards[name]["tiles"])
                       and all("quality" in t for t in cards[name]["tiles"][1:]) for name in names)

        assert wait_for(settled, 90), browser.evaluate(TILES)
        cards = {c["image"]: c for c in browser.evaluate(TILES)}
        shot = browser.screenshot()
        Image.fromarray(shot).save(tmp_path / "view.png")
        events = [json.loads(line) for line in (tmp_path / "rx" / "events.jsonl").read_text().splitlines()]
        stage_events = {e["key"]: e for e in events if e["status"] == "stage"}
        latencies, to_page = [], []
        for name in names:
            tiles = cards[name]["tiles"]
            assert [t["index"] for t in tiles] == [str(i) for i in range(len(tiles))]
            assert [t["label"] for t in tiles] == ["semantic+map"] + [f"pixel.{i}" for i in range(len(tiles) - 1)]
            assert all(t["status"] == "stage" for t in tiles)
            shown = [float(t["shownAt"]) for t in tiles]
            logged = [float(t["loggedAt"]) for t in tiles]
            assert shown == sorted(shown) and logged == sorted(logged)  # each stage appeared after the one before
            # a stage cannot appear before the receiver logged it (one machine's wall clock; 50 ms of slack)
            assert all(s >= lg - 50 for s, lg in zip(shown, logged, strict=True))
            latencies += [s - lg for s, lg in zip(shown, logged, strict=True)]
            arrived = [float(t["receivedAt"]) for t in tiles]  # the page's clock when its event came
            to_page += [a - lg for a, lg in zip(arrived, logged, strict=True)]
            assert cards[name]["state"] == "complete"
            psnrs = [json.loads(t["quality"])["psnr"] for t in tiles[1:]]
            assert psnrs == sorted(psnrs)  # quality known from the bundled reference, rising stage by stage
            assert all(set(json.loads(t["quality"])) >= {"psnr", "ms_ssim", "ssimulacra2", "flip"} for t in tiles[1:])

            # the screenshot: each tile shows its own stage (closest to the receiver's PNG of that stage)
            stage_pngs = [np.asarray(Image.open(stage_events[t["key"]]["path"]).convert("RGB")) for t in tiles]
            for i, tile in enumerate(tiles):
                x, y, w, h = _content_box(tile["rect"], tile["natural"])
                crop = shot[y:y + h, x:x + w].astype(float)
                errors = [np.mean((np.asarray(Image.fromarray(png).resize((w, h), Image.Resampling.BILINEAR),
                                              dtype=float) - crop) ** 2) for png in stage_pngs]
                assert int(np.argmin(errors)) == i, (name, i, errors)
        bars = browser.evaluate("document.querySelectorAll('#chart-bytes polyline.series').length")
        assert bars == len(names)  # one line per image on the live chart

        print(f"\nscreenshot {tmp_path / 'view.png'}; decode-to-paint over {len(latencies)} stages: median "
              f"{np.median(latencies):.0f} ms, max {max(latencies):.0f} ms (event to the page: median "
              f"{np.median(to_page):.0f} ms; the rest is the PNG's fetch, decode and paint)")

        _stop(receiver)  # the receiver goes away: the page says so
        assert wait_for(lambda: browser.evaluate("document.getElementById('status')?.dataset.state") == "gone", 30)
        assert "receiver gone" in browser.evaluate("document.getElementById('status')?.textContent")
    finally:
        if browser is not None:
            browser.close()
        for proc in (view, receiver):
            if proc is not None:
                _stop(proc)
        rx_log.close()
        view_log.close()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.headers.get("Content-Type"), reply.read()


def test_receiver_web_serves_its_stages_and_prints_one_line_per_stage(tmp_path):
    """`miscnet receiver --web`: the view inside the receiver, fed from its event log; its token guards it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    out = (logs / "receiver.log").open("w")
    receiver = _miscnet("receiver", "--listen", "127.0.0.1:0", "--port-file", str(logs / "rx.port"), "--out",
                        str(tmp_path / "rx"), "--token", TOKEN, "--policy", "fifo", "--web", "127.0.0.1:0",
                        "--web-port-file",
                        str(logs / "web.port"), log=out)
    try:
        rx_port = _port(logs / "rx.port", receiver)
        web = f"http://127.0.0.1:{_port(logs / 'web.port', receiver)}"
        for path in ("/", "/state.json", "/events", "/png/0.png"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(web + path, timeout=10)
            assert refused.value.code == 401, path
        status, kind, body = _get(f"{web}/?token={TOKEN}")
        assert status == 200 and kind.startswith("text/html") and b"view.js" in body
        assert b"EventSource" in _get(f"{web}/view.js")[2]  # code, not data: no token needed, nothing from a CDN
        assert b"http" not in _get(f"{web}/view.js")[2].replace(b"http://www.w3.org/2000/svg", b"")

        (name, encoded), = encoded_samples(["chelsea"], 900)
        results = send_images([(name, encoded)], SenderOptions(target=f"127.0.0.1:{rx_port}", token=TOKEN,
                                                               transport=TransportConfig(mode="arq")))
        assert results[0].delivered

        def stages():
            state = json.loads(_get(f"{web}/state.json?token={TOKEN}")[2])
            return state, [e for e in state["events"] if e["status"] == "stage"]

        assert wait_for(lambda: len(stages()[1]) == len(encoded.layers) - 1, 30)
        state, events = stages()
        assert state["status"]["state"] == "connected"
        assert [e["label"] for e in events] == ["semantic+map", "pixel.0", "pixel.1"]
        assert all(e["logged_at"] and e["image"] == name for e in events)
        status, kind, png = _get(f"{web}/png/{events[-1]['png']}.png?token={TOKEN}")
        assert kind == "image/png" and Image.open(io.BytesIO(png)).size == (encoded.width, encoded.height)
        # quality against the bundled sample, once measured (after the picture, never before it)
        assert wait_for(lambda: all("quality" in e for e in stages()[1][1:]), 60)
        assert stages()[1][-1]["quality"]["psnr"] > stages()[1][1]["quality"]["psnr"]
    finally:
        _stop(receiver)
        out.close()
    lines = (logs / "receiver.log").read_text().splitlines()
    stage_lines = [ln for ln in lines if " stage " in ln]
    assert len(stage_lines) == 3 and "semantic+map" in stage_lines[0] and "(complete)" in stage_lines[2]
    assert all(": decoded in" in ln for ln in stage_lines)


def test_view_says_when_the_receiver_is_not_there(tmp_path):
    """`miscnet view` against a port nobody listens on: the page's state says so (and it keeps retrying)."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "view.log").open("w")
    view = _miscnet("view", "--watch", f"127.0.0.1:{port}", "--web", "127.0.0.1:0", "--web-port-file",
                    str(tmp_path / "web.port"), log=log)
    try:
        web = f"http://127.0.0.1:{_port(tmp_path / 'web.port', view)}"

        def state():
            return json.loads(_get(f"{web}/state.json")[2])["status"]

        assert wait_for(lambda: state()["state"] == "gone", 30)
        assert "is not reachable" in state()["detail"]
    finally:
        _stop(view)
        log.close()


def test_demo_plots_and_lines_mark_stages_that_were_not_decoded(tmp_path):
    """A superseded stage is still reported: a receiver line, a row of the demo's table, a hollow mark."""
    from miscnet.experiments.demo import format_live_table
    from miscnet.experiments.plots_demo import write_demo_plots
    from miscnet.receiver.node import stage_line

    base = {"image": "coffee", "complete": False, "decode_latency_s": None, "psnr": None, "ms_ssim": None,
            "ssimulacra2": None, "flip": None, "logged_at": 0.0}
    rows = [{**base, "stage": "map", "label": "semantic+map", "status": "stage", "time_s": 0.1, "wire_bytes": 216,
             "payload_bytes": 145, "decode_latency_s": 0.02},
            {**base, "stage": "pixel.0", "label": "pixel.0", "status": "superseded", "time_s": 0.4, "wire_bytes": 584,
             "payload_bytes": 437},
            {**base, "stage": "pixel.1", "label": "pixel.1", "status": "stage", "time_s": 1.0, "wire_bytes": 1112,
             "payload_bytes": 863, "complete": True, "decode_latency_s": 0.3, "psnr": 22.9, "ms_ssim": 0.77,
             "ssimulacra2": -61.6, "flip": 0.24}]
    table = format_live_table(rows)
    assert "semantic+map" in table and "superseded" in table and "-61.6" in table
    paths = write_demo_plots(rows, tmp_path)
    assert [p.name for p in paths] == ["quality_vs_bytes.png", "quality_vs_time.png"]
    assert all(Image.open(p).size[0] > 600 for p in paths)
    line = stage_line({"key": "s0001/1/1", "stream": "s0001", "image": "coffee", "stage": "pixel.0",
                       "status": "superseded", "wire_bytes": 584, "time_s": 0.4})
    assert "stage 1 pixel.0" in line and "superseded" in line and "not decoded" in line
    assert stage_line({"key": "s0001/1/stored", "status": "stored"}) is None
    assert "semantic+map" in stage_line({"key": "s/1/0", "stage": "map", "status": "stage", "decode_latency_s": 0.01})


def test_view_honours_the_receivers_tls_and_serves_https(tmp_path, certs):
    """A TLS receiver: the view reaches it with the CA, and serves its own page over HTTPS."""
    import ssl

    from live_nodes import Receiver

    files, ca = certs
    cert, key = files["server"]
    rx = Receiver(tmp_path, tls=TlsFiles(cert, key))
    log = (tmp_path / "view.log").open("w")
    view = _miscnet("view", "--watch", rx.target, "--tls-ca", ca, "--web", "127.0.0.1:0", "--web-port-file",
                    str(tmp_path / "web.port"), "--web-tls-cert", cert, "--web-tls-key", key, log=log)
    try:
        web = f"https://127.0.0.1:{_port(tmp_path / 'web.port', view)}/state.json"
        context = ssl.create_default_context(cafile=ca)

        def state():
            with urllib.request.urlopen(web, timeout=10, context=context) as reply:
                return json.loads(reply.read())["status"]["state"]

        assert wait_for(lambda: state() == "connected", 30)
        with pytest.raises(OSError):  # plain HTTP is not answered (reset, or a URLError)
            urllib.request.urlopen(web.replace("https", "http"), timeout=10)
    finally:
        _stop(view)
        log.close()
        rx.stop()
