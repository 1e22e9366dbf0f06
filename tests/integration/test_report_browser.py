"""report.html opened in headless Chromium: every image decodes and the console stays free of errors.

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages separated by NUL
bytes on file descriptors 3 and 4), so the test needs nothing but Debian's ``chromium`` package: no Python browser
driver, no browser download, no network port.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from raymem.audit.report import CopyPair, render_report, write_report

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--remote-debugging-pipe",
]
PROTOCOL_TIMEOUT_S = 60.0
# Waits for every <img> to finish decoding, then reports each one's natural size.
IMAGES_EXPRESSION = """
Promise.all(Array.from(document.images, (image) =>
    image.decode().then(() => true, () => false).then(() => ({
        alt: image.alt, naturalWidth: image.naturalWidth, naturalHeight: image.naturalHeight,
    }))))
"""


class DevToolsPipe:
    """A headless Chromium driven over its DevTools pipe, one command at a time."""

    def __init__(self, executable: str, work_dir: Path):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; park both ends above 3 and 4 so the child can
        # move them there without clobbering one with the other.
        high_read = fcntl.fcntl(commands_read, fcntl.F_DUPFD_CLOEXEC, 10)
        high_write = fcntl.fcntl(replies_write, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (commands_read, replies_write):
            os.close(fd)

        def move_pipe_ends():
            os.dup2(high_read, 3)
            os.dup2(high_write, 4)

        # Chromium's own log goes to a file: a pipe nobody drains could fill and stall the browser.
        self.log_path = work_dir / "chromium.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [executable, *CHROMIUM_FLAGS, f"--user-data-dir={work_dir / 'profile'}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False, preexec_fn=move_pipe_ends,
            )
        os.close(high_read)
        os.close(high_write)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session_id: str | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                assert "error" not in reply, f"{method} failed: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_for_event(self, method: str, session_id: str) -> dict:
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session_id:
                    return event
            self.events.append(self._receive())

    def _receive(self) -> dict:
        deadline = time.monotonic() + PROTOCOL_TIMEOUT_S
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._replies, 1 << 20) if ready else b""
            if not chunk:
                self.process.kill()
                why = "closed its DevTools pipe" if ready else f"did not answer within {PROTOCOL_TIMEOUT_S:g} s"
                log_tail = self.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"Chromium {why}; its log ends:\n{log_tail}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            self.process.kill()
        self.process.wait(timeout=30)
        os.close(self._commands)
        os.close(self._replies)


def open_page(browser: DevToolsPipe, path: Path) -> dict:
    """Load a local page in a fresh tab; returns its image count, its images that did not decode, its console errors."""
    target_id = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session_id = browser.send("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        browser.send(f"{domain}.enable", session_id=session_id)
    navigation = browser.send("Page.navigate", {"url": path.as_uri()}, session_id=session_id)
    assert "errorText" not in navigation, f"Chromium could not open {path}: {navigation['errorText']}"
    browser.wait_for_event("Page.loadEventFired", session_id)
    evaluation = browser.send(
        "Runtime.evaluate", {"expression": IMAGES_EXPRESSION, "awaitPromise": True, "returnByValue": True},
        session_id=session_id,
    )
    assert "exceptionDetails" not in evaluation, f"image check threw: {evaluation['exceptionDetails']}"
    images = evaluation["result"]["value"]
    browser.send("Target.closeTarget", {"targetId": target_id})
    console_errors = [
        event["params"] for event in browser.events if event.get("sessionId") == session_id and (
            event["method"] == "Runtime.exceptionThrown"
            or (event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] in ("error", "assert"))
            or (event["method"] == "Log.entryAdded" and event["params"]["entry"]["level"] == "error")
        )
    ]
    return {"broken_images": [image for image in images if image["naturalWidth"] == 0], "n_images": len(images),
            "console_errors": console_errors}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: install Debian's package with `apt-get install -y chromium`")
    pipe = DevToolsPipe(executable, tmp_path_factory.mktemp("chromium"))
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    """A report with a 2D pair, a 3D pair (channel-first), an id-only pair and a per-patient table."""
    rng = np.random.default_rng(0)
    image_2d = rng.normal(size=(1, 64, 48)).astype(np.float32)
    volume = rng.normal(size=(1, 16, 32, 24)).astype(np.float32)
    metrics = {
        "threshold": 0.93, "percentile": 95.0, "calibration": "paper", "n_train": 200, "n_val": 50,
        "n_synthetic": 200, "n_memorized_train": 30, "pct_memorized_train": 15.0, "n_copies": 60, "pct_copies": 30.0,
        "n_patients": 20, "pct_memorized_patients": 40.0, "implied_fpr": 0.05, "sensitivity": 0.9,
        "specificity": 0.95, "precision": 0.85, "roc_auc": 0.97,
    }
    pairs = [
        CopyPair("syn-0001", "train-0042", "patient-07", 0.991, image_2d + 0.05, image_2d),
        CopyPair("syn-0002", "train-0100", "patient-03", 0.962, volume, volume * 2.0 - 1.0),
        CopyPair("syn-0003", "train-0007", "patient-01", 0.941),
    ]
    patients = [
        {"patient_id": f"patient-{index:02d}", "n_train_images": 10, "n_memorized": index % 3,
         "best_score": 0.9 + index / 1000} for index in range(20)
    ]
    html = render_report(
        metrics=metrics, synthetic_top1=rng.uniform(0.7, 1.0, 200), null_scores=rng.uniform(0.6, 0.95, 200),
        pairs=pairs, patients=patients,
    )
    path = tmp_path_factory.mktemp("audit") / "report.html"
    write_report(str(path), html)
    return path


def copy_with_extra_element(report_path: Path, element: str, name: str) -> Path:
    """A copy of the report named ``name`` with ``element`` appended to its body."""
    page = report_path.read_text(encoding="utf-8").replace("</body>", f"{element}\n</body>")
    copy = report_path.with_name(name)
    copy.write_text(page, encoding="utf-8")
    return copy


def test_a_broken_image_is_detected(browser, report_path):
    broken = copy_with_extra_element(
        report_path, '<img alt="deliberately broken" src="data:image/png;base64,iVBORw0KGgo=">', "broken-image.html"
    )

    result = open_page(browser, broken)

    assert [image["alt"] for image in result["broken_images"]] == ["deliberately broken"]


def test_a_network_fetch_is_blocked_and_reported_as_a_console_error(browser, report_path):
    fetching = copy_with_extra_element(
        report_path, '<img alt="remote" src="http://127.0.0.1:9/remote.png">', "network-fetch.html"
    )

    result = open_page(browser, fetching)

    assert any("Content Security Policy" in json.dumps(error) for error in result["console_errors"])


def test_report_images_all_decode_without_console_errors(browser, report_path):
    result = open_page(browser, report_path)

    assert (result["n_images"], result["broken_images"], result["console_errors"]) == (1 + 2 + 2, [], [])
