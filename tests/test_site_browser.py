"""The leaderboard page in a real browser: headless Debian Chromium driven over the DevTools protocol
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3 and 4; no
extra Python package). Skipped when no chromium is installed (``apt-get install chromium``)."""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

import pytest

from benchmark.store import Store
from leaderboard.build import publish
from leaderboard.scores import cells_from_store, score
from tests.test_leaderboard import GRID, record

pytestmark = pytest.mark.browser

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EVIL_LABEL = "evil<script>window.__pwned=1</script>"
EVIL_TITLE = '<img src=x onerror="window.__pwned=2">Evil'


class DevTools:
    """A minimal DevTools-protocol client over chromium's debugging pipe."""

    def __init__(self, binary: str, profile: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds() -> None:  # chromium reads commands on fd 3 and writes replies on fd 4
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=child_fds, pass_fds=(), close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self._replies: dict[int, queue.Queue] = {}
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._lock:
                    if "id" in msg and msg["id"] in self._replies:
                        self._replies[msg["id"]].put(msg)
                    else:
                        self.events.append(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            ident = self._next
            self._replies[ident] = queue.Queue()
        msg = {"id": ident, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        reply = self._replies[ident].get(timeout=timeout)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                hit = [e for e in self.events if e.get("method") == method]
            if hit:
                return hit[0]
            time.sleep(0.05)
        raise TimeoutError(f"no {method} event within {timeout}s")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, queue.Empty, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The generated index.html loaded in headless chromium: (client, session id, page path)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser test needs it")
    root = tmp_path_factory.mktemp("site")
    with Store(root / "results.sqlite") as store:
        for (d, a, b), acc in GRID.items():
            store.put(record(d, a, b, 0, acc))
        store.put(record(EVIL_LABEL, "scratch", "b1", 0, 35.0, name="evil"))
        store.put(record(EVIL_LABEL, "linear_probe", "b1", 0, 45.0, name="evil"))
        cells = cells_from_store(store)
    board = score(cells, metadata={("t", EVIL_LABEL): {"title": EVIL_TITLE, "paper": "2101.04898"}})
    site = publish(board, root / "out").site
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=root)
    client = DevTools(CHROMIUM, profile)
    try:
        target = client.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = client.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            client.send(f"{domain}.enable", session=session)
        client.send("Page.navigate", {"url": site.as_uri()}, session=session)
        client.wait_event("Page.loadEventFired")
        yield client, session, site
    finally:
        client.close()


def evaluate(page, expression: str) -> Any:
    client, session, _ = page
    reply = client.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    if "exceptionDetails" in reply:
        raise AssertionError(f"script error in {expression!r}: {reply['exceptionDetails']}")
    return reply["result"].get("value")


def column(page, index: int) -> list[str]:
    return evaluate(page, "Array.from(document.querySelectorAll('#ranking-t tbody tr'))"
                          f".map(r => r.cells[{index}].textContent.trim())")


def test_table_renders(page):
    rows = evaluate(page, "document.querySelectorAll('#ranking-t tbody tr').length")
    assert rows == 4, f"the ranking table must show 4 defenses, shows {rows}"
    images = evaluate(page, "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
    assert images >= 2, f"the inlined plots must render, {images} did"


def test_clicking_a_header_sorts(page):
    start = column(page, 1)
    evaluate(page, "document.querySelector('#ranking-t thead th:nth-child(2)').click()")
    asc = column(page, 1)
    assert asc == sorted(start, key=str.lower) and asc != start, f"clicking 'defense' must sort it: {asc}"
    evaluate(page, "document.querySelector('#ranking-t thead th:nth-child(2)').click()")
    assert column(page, 1) == asc[::-1], "a second click must reverse the order"
    headers = evaluate(page, "Array.from(document.querySelectorAll('#ranking-t thead th')).map(h => h.textContent)")
    at = next(i for i, h in enumerate(headers) if h.lower().startswith("worst-case"))  # found by its title
    evaluate(page, f"document.querySelector('#ranking-t thead th:nth-child({at + 1})').click()")
    worst = [float(v.split()[0]) for v in column(page, at)]
    assert worst == sorted(worst), f"the worst-case column must sort numerically: {worst}"


def test_plugin_text_is_shown_as_text(page):
    assert evaluate(page, "window.__pwned === undefined"), "a script in a plugin label or title must not run"
    text = evaluate(page, "document.body.innerText")
    assert EVIL_LABEL in text, "the label with <script> must appear literally"
    assert EVIL_TITLE in text, "the title with an <img> tag must appear literally"
    injected = evaluate(page, "document.querySelectorAll('img:not([src^=\"data:\"])').length")
    assert injected == 0, "no element may be created from plugin text"


def test_no_console_errors(page):
    evaluate(page, "document.querySelector('#ranking-t thead th:nth-child(1)').click()")
    client = page[0]
    with client._lock:
        events = list(client.events)
    errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, f"the page logged errors: {errors}"
