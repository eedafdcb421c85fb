"""The web chat page at / in headless Chromium (Debian's `chromium`), driven over the DevTools protocol:
type a message, press Enter, watch the answer stream in."""

import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:  # the test needs it: install it rather than skip
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))  # fmt: skip
        path = shutil.which("chromium")
    assert path, "chromium is not installed and could not be installed with apt-get"
    return path


class Browser:
    """Chromium with --remote-debugging-pipe: DevTools messages are NUL-terminated JSON, read by the
    browser on fd 3 and written on fd 4 (no websocket client needed)."""

    def __init__(self, profile: str):
        to_r, self.w = os.pipe()
        self.r, from_w = os.pipe()
        # move the child's ends above 4 so bash's `3<&N 4>&M` cannot clobber one with the other
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_r, from_w))
        os.close(to_r)
        os.close(from_w)
        self.log = open(os.path.join(profile, "chromium.log"), "w+")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{a} 4>&{b}', "bash", chromium(), "--headless", "--no-sandbox",
             "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(a, b), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )  # fmt: skip
        os.close(a)
        os.close(b)
        self.buf = b""
        self.n = 0
        self.events: list[dict] = []

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from chromium")
            if select.select([self.r], [], [], left)[0]:
                data = os.read(self.r, 1 << 16)
                if not data:
                    self.log.seek(0)
                    raise AssertionError(f"chromium exited: {self.log.read()[-3000:]}")
                self.buf += data
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self.n:
                assert "error" not in m, (method, m["error"])
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._recv(deadline))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.r)
        os.close(self.w)
        self.log.close()


class Page:
    def __init__(self, browser: Browser, url: str):
        self.b = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.sid = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})
        self.b.wait_event("Page.loadEventFired")

    def call(self, method: str, params: dict | None = None, timeout: float = 30):
        return self.b.call(method, params, session=self.sid, timeout=timeout)

    def js(self, expression: str, timeout: float = 30):
        r = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                      timeout=timeout)  # fmt: skip
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 60):
        """Resolves inside the page as soon as `condition` (a JS expression) is truthy."""
        return self.js(
            f"""new Promise((resolve, reject) => {{
                const t0 = performance.now();
                (function poll() {{
                    let v; try {{ v = ({condition}); }} catch (e) {{}}
                    if (v) resolve(v);
                    else if (performance.now() - t0 > {timeout * 1000}) reject(new Error("timed out: " + {json.dumps(condition)}));
                    else requestAnimationFrame(poll);
                }})();
            }})""",
            timeout=timeout + 5,
        )

    def type_and_enter(self, text: str) -> None:
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", {"text": text})
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13})  # fmt: skip


RECORD = """
window.__seen = [];
new MutationObserver(() => {
  const el = [...document.querySelectorAll('.msg.assistant')].pop();
  if (el) window.__seen.push([el.dataset.state, el.textContent.length]);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true, attributes: true});
"""
LAST_DONE = (
    "(() => { const el = [...document.querySelectorAll('.msg.assistant')].pop(); "
    "return el && el.dataset.state !== 'streaming' && document.body.dataset.busy === 'false' && el; })()"
)


@pytest.fixture
def server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "dllama", "api", "--port", "0", "--nthreads", "1", "--temperature", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = None
    for line in proc.stderr:  # the model loads, then the server says where it listens
        if m := re.search(r"serving \S+ at (http://\S+/) ", line):
            url = m.group(1)
            break
    assert url, "dllama api did not start"
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0


def test_web_page_streams_an_answer(server, tmp_path):
    browser = Browser(str(tmp_path))
    try:
        page = Page(browser, server)
        assert page.js("document.title") == "dllama chat"
        page.wait_for("document.getElementById('model').textContent.startsWith('SmolLM2')")
        page.js(RECORD)
        page.type_and_enter("What is the capital of Germany?")
        page.wait_for(LAST_DONE)
        answer = page.js("[...document.querySelectorAll('.msg.assistant')].pop().textContent")
        assert "Berlin" in answer, answer
        assert page.js("[...document.querySelectorAll('.msg.user')].pop().textContent") == (
            "What is the capital of Germany?"
        )
        seen = page.js("window.__seen")
        growing = sorted({n for state, n in seen if state == "streaming" and n > 0})
        assert len(growing) >= 3, seen  # the text arrived piece by piece, not at once
        assert growing[-1] <= len(answer)
        stats = page.js("[...document.querySelectorAll('.stats')].pop().textContent")
        assert re.search(r"\d+ new prompt tokens, 0 reused · \d+ tokens, [\d.]+ tokens/s", stats), stats

        # the second turn sends the whole conversation; the server serves the first exchange from its cache
        page.type_and_enter("What is 2+2?")
        page.wait_for(f"document.querySelectorAll('.stats').length === 2 && {LAST_DONE}")
        assert "4" in page.js("[...document.querySelectorAll('.msg.assistant')].pop().textContent")
        stats = page.js("[...document.querySelectorAll('.stats')].pop().textContent")
        new, reused = map(int, re.search(r"(\d+) new prompt tokens, (\d+) reused", stats).groups())
        assert reused > 30 and new < 25, stats
        assert page.js("document.querySelectorAll('.msg.error').length") == 0
    finally:
        browser.close()
