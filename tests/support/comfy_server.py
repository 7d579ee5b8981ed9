"""Starts the real ComfyUI server of the host and drives it over its HTTP API (/prompt, /history)."""
import asyncio
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid


TEXT_EVENT = 3  # ComfyUI's protocol.BinaryEventTypes.TEXT: text shown on a node in the graph editor


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process, grace_seconds):
    """Asks a child process to end, kills it if it has not within the grace time, and reaps it."""
    process.terminate()
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class PromptFailed(RuntimeError):
    pass


class ComfyServer:
    """`with ComfyServer(comfyui_dir) as server:` runs `main.py` on 127.0.0.1 and always stops it."""

    def __init__(self, comfyui_dir, python=sys.executable, extra_args=(), start_timeout=180):
        self.comfyui_dir = comfyui_dir
        self.python = python
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.port = None
        self.process = None
        self.log_path = None
        self.client_id = uuid.uuid4().hex

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        import torch

        self.port = free_port()
        device_args = [] if torch.cuda.is_available() else ["--cpu"]
        frontend_args = ([] if importlib.util.find_spec("comfyui_frontend_package")
                         else ["--front-end-root", self.no_frontend_folder()])
        log = tempfile.NamedTemporaryFile("w", prefix="comfyui-", suffix=".log", delete=False)
        self.log_path = log.name
        self.process = subprocess.Popen(
            [self.python, "main.py", *device_args, "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", *frontend_args, *self.extra_args],
            cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.start_timeout} s:\n{self.log()}")

    @staticmethod
    def no_frontend_folder():
        """ComfyUI exits at start without its frontend package (not on the GPU machines' images) unless given
        a frontend folder: an empty one serves the API alone, which is all the tests use there."""
        return tempfile.mkdtemp(prefix="comfyui-no-frontend-")

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        stop_process(self.process, grace_seconds=15)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path, payload):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def queue(self, workflow):
        """Queues an API-format workflow; a validation error raises PromptFailed with the server's answer."""
        try:
            return self.post("/prompt", {"prompt": workflow, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as error:
            raise PromptFailed(error.read().decode(errors="replace")) from error

    def wait(self, prompt_id, timeout=600):
        """The /history entry of a finished prompt; PromptFailed if it ended in an error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log()}")
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] != "success":
                    raise PromptFailed(json.dumps(entry["status"], indent=1))
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def wait_until_running(self, prompt_id, timeout=120):
        """Returns once the server has started executing the prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(item[1] == prompt_id for item in self.get("/queue")["queue_running"]):
                return
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not start within {timeout} s")

    def run(self, workflow, timeout=600):
        return self.wait(self.queue(workflow), timeout)

    def run_showing_node_texts(self, workflow, timeout=600):
        """Runs the workflow while listening on the websocket as the graph editor does.

        Returns the /history entry and {node id: [texts the server showed on that node]}.
        """
        return asyncio.run(asyncio.wait_for(self._run_showing_node_texts(workflow), timeout))

    async def _run_showing_node_texts(self, workflow):
        import aiohttp

        texts = {}
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}") as socket:
                prompt_id = await asyncio.to_thread(self.queue, workflow)
                async for message in socket:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        event, node_id_length = struct.unpack(">II", message.data[:8])
                        if event == TEXT_EVENT:
                            node_id = message.data[8:8 + node_id_length].decode()
                            texts.setdefault(node_id, []).append(message.data[8 + node_id_length:].decode())
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(message.data)
                        if event["type"] == "executing" and event["data"]["node"] is None \
                                and event["data"].get("prompt_id") == prompt_id:
                            break
        return await asyncio.to_thread(self.wait, prompt_id), texts
