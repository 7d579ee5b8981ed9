"""Debian's Chromium, headless, driven over the Chrome DevTools Protocol: no browser download, no
Node.js; only aiohttp, which ComfyUI already requires.

    with HeadlessChromium() as browser:
        browser.navigate("http://127.0.0.1:8188/")
        browser.wait_for("window.app !== undefined")
        browser.screenshot("page.png")
"""
import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time

from tests.support.comfy_server import stop_process

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
INSTALL_HINT = "install Debian's chromium (apt-get install chromium) or set FLUXACCEL_CHROMIUM to a Chromium binary"


class BrowserError(RuntimeError):
    pass


def find_chromium():
    configured = os.environ.get("FLUXACCEL_CHROMIUM")
    if configured:
        return configured
    for name in CHROMIUM_CANDIDATES:
        if path := shutil.which(name):
            return path
    raise BrowserError(f"no Chromium found: {INSTALL_HINT}")


class HeadlessChromium:
    def __init__(self, width=1600, height=1000, start_timeout=30):
        self.width, self.height, self.start_timeout = width, height, start_timeout
        self.loop = asyncio.new_event_loop()
        self.message_ids = itertools.count(1)

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="fluxaccel-chromium-")
        self.process = subprocess.Popen(
            [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.loop.run_until_complete(self._connect(self._debugging_port()))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info):
        if getattr(self, "session", None) is not None:
            self.loop.run_until_complete(self.session.close())
        stop_process(self.process, grace_seconds=10)
        self.loop.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _debugging_port(self):
        """The port Chromium chose, from the file it writes into its profile once it listens."""
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"Chromium exited with code {self.process.returncode} at start-up")
            if os.path.exists(port_file):
                with open(port_file) as f:
                    lines = f.read().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.1)
        raise BrowserError(f"Chromium did not open its DevTools port within {self.start_timeout} s")

    async def _connect(self, port):
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(target for target in targets if target["type"] == "page")
        self.socket = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    def send(self, method, timeout=60, **params):
        """One DevTools command; returns its result (events that arrive meanwhile are not needed)."""
        return self.loop.run_until_complete(asyncio.wait_for(self._send(method, params), timeout))

    async def _send(self, method, params):
        message_id = next(self.message_ids)
        await self.socket.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message["result"]

    def evaluate(self, expression, timeout=60):
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{details.get('text')}: {details.get('exception', {}).get('description')}")
        return result["result"].get("value")

    def navigate(self, url):
        self.send("Page.navigate", url=url)

    def wait_for(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(f"Boolean({expression})"):
                return
            time.sleep(0.2)
        raise BrowserError(f"timed out after {timeout} s waiting for {expression}")

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
