"""Render a page in headless Chromium and report what happened, over the DevTools protocol.

The browser is driven through ``--remote-debugging-pipe`` (JSON messages ending in a NUL byte,
commands on fd 3, replies and events on fd 4), so no websocket library is needed.
:func:`render` opens a page, waits for its load event, and returns every URL the page asked
for, every console message and exception, and what each ``<img>`` loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio")
"""Chromium flags: headless, and none of the browser's own traffic (updates, sync, safe
browsing), so that any request seen comes from the page."""


def chromium() -> str | None:
    """The Chromium executable (Debian's ``chromium`` package), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Rendered:
    """What a page did when loaded: ``requests`` (every URL asked for, in order),
    ``console`` ((level, text) of every console message, log entry and exception), ``images``
    (per ``<img>``: ``complete``, ``width`` = naturalWidth, ``height``, ``alt``), ``title``."""

    requests: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    title: str = ""
    overflow: int = 0
    """How far the page is wider than the window (px): > 0 means a horizontal scrollbar."""
    screenshot: bytes = b""
    """A PNG of the window as rendered."""

    @property
    def errors(self) -> list[str]:
        return [text for level, text in self.console if level in ("error", "exception", "assert")]

    @property
    def fetched(self) -> list[str]:
        """Requests that leave the page's own file: anything but ``file:`` and ``data:`` URLs."""
        return [u for u in self.requests if not u.startswith(("file:", "data:"))]


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from Chromium")
            import select

            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def wait_for(self, method: str, timeout: float) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            event = self.receive(max(0.0, deadline - time.monotonic()))
            if event.get("method") == method:
                return event
            self.events.append(event)


_IMAGES = ("JSON.stringify(Array.from(document.images).map(i => ({complete: i.complete, "
           "width: i.naturalWidth, height: i.naturalHeight, alt: i.alt})))")


_OVERFLOW = "document.documentElement.scrollWidth - document.documentElement.clientWidth"


def render(page: Path, *, timeout: float = 60.0, settle: float = 0.5, width: int = 1400,
           height: int = 900) -> Rendered:
    """Load `page` (a local file) in headless Chromium in a window `width` × `height` CSS pixels
    (below 600 px wide, as a phone); return what it fetched, logged and loaded, how far it
    overflows the window sideways, and a screenshot."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    commands_r, commands_w = os.pipe()
    replies_r, replies_w = os.pipe()

    def child_fds() -> None:  # in the child, before exec: the pipe ends on fds 3 and 4
        a = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(replies_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    profile = tempfile.mkdtemp(prefix="genprobe-chromium-")
    proc = subprocess.Popen([exe, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
                             "about:blank"], preexec_fn=child_fds, pass_fds=(3, 4),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(commands_r)
    os.close(replies_w)
    pipe = _Pipe(commands_w, replies_r)
    out = Rendered()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1,
                   "mobile": width < 600}, session=session)
        pipe.events.clear()  # about:blank's own events
        pipe.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=session)
        pipe.wait_for("Page.loadEventFired", timeout)
        time.sleep(settle)  # late console messages
        value = pipe.send("Runtime.evaluate", {"expression": _IMAGES, "returnByValue": True},
                          session=session)["result"]["value"]
        out.images = json.loads(value)
        out.title = pipe.send("Runtime.evaluate", {"expression": "document.title",
                                                   "returnByValue": True},
                              session=session)["result"]["value"]
        out.overflow = int(pipe.send("Runtime.evaluate", {"expression": _OVERFLOW,
                                                          "returnByValue": True},
                                     session=session)["result"]["value"])
        import base64

        out.screenshot = base64.b64decode(pipe.send("Page.captureScreenshot", {"format": "png"},
                                                    session=session)["data"])
        for event in pipe.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.requestWillBeSent":
                out.requests.append(params["request"]["url"])
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                out.console.append((params.get("type", ""), text))
            elif method == "Runtime.exceptionThrown":
                out.console.append(("exception", params["exceptionDetails"].get("text", "")))
            elif method == "Log.entryAdded":
                entry = params["entry"]
                out.console.append((entry.get("level", ""), entry.get("text", "")))
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass
    finally:
        os.close(commands_w)
        os.close(replies_r)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return out
