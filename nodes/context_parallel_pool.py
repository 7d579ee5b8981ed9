"""Rank 0's side of Context Parallel: the worker processes, the process group, replicas, failures.

ComfyUI's process is rank 0. torch.distributed keeps one default process group per process, so the
process holds at most one pool of workers: a node asking for another layout replaces it. Workers
live across prompts and hold one replica; a failure anywhere tears the pool down, and the next
prompt starts a fresh one.
"""
import atexit
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..kernels.context_parallel import ParallelDegrees, RankGroups, make_rank_groups
from ..kernels.tensor_transport import send_tensors
from .context_parallel_ranks import DropReplica, Stop

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "context_parallel_worker.py")
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = __name__.split(".")[0]
# Importing ComfyUI and the pack in a worker takes seconds; a cold CUDA start can take a minute.
STARTUP_SECONDS = 180
# How long a collective waits for a rank that is alive but slow (compiling its blocks, say). A
# rank that died breaks the connections at once and does not wait for this.
COLLECTIVE_TIMEOUT = timedelta(minutes=15)
FAILURE_REPORT_SECONDS = 3.0


@dataclass(frozen=True)
class PoolLayout:
    degrees: ParallelDegrees
    devices: tuple  # torch device of each rank, rank 0 first (ComfyUI's own device)
    visible_gpus: tuple  # per rank: the CUDA_VISIBLE_DEVICES entry of its GPU ("" on CPU)
    port: int  # rendezvous port on 127.0.0.1, 0 for a free one

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.devices[0]).type == "cuda" else "gloo"


def rendezvous_port(port: int) -> int:
    """`port` if it is free on 127.0.0.1 (any free port for 0), or a ValueError naming the fix."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise ValueError(f"port {port} is already in use ({error.strerror}); choose another port, "
                             "or 0 to pick a free one.") from error
        return probe.getsockname()[1]


class WorkerFailed(RuntimeError):
    pass


class RankPool:
    def __init__(self, layout: PoolLayout):
        self.layout = layout
        self.device = torch.device(layout.devices[0])
        self.processes: list[subprocess.Popen] = []
        self.connections: list[Connection] = []
        self.groups: Optional[RankGroups] = None
        self.replica_key = None
        self.run_serial = 0

    def start(self, comfy_args: dict):
        port = rendezvous_port(self.layout.port)
        world_size = self.layout.degrees.world_size
        for rank in range(1, world_size):
            self._spawn(rank, port, comfy_args)
        self._wait_until_ready()
        dist.init_process_group(self.layout.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                                **({"device_id": self.device} if self.device.type == "cuda" else {}))
        self.groups = make_rank_groups(self.layout.degrees)
        logging.info("Context Parallel: %d ranks ready (Ulysses %d x ring %d, %s)", world_size,
                     self.layout.degrees.ulysses, self.layout.degrees.ring, self.layout.backend)

    def _spawn(self, rank, port, comfy_args):
        ours, theirs = socket.socketpair()
        environment = dict(os.environ)
        worker_device = torch.device(self.layout.devices[rank])
        if worker_device.type == "cuda":
            environment["CUDA_VISIBLE_DEVICES"] = self.layout.visible_gpus[rank]
            worker_device = torch.device("cuda", 0)
        paths = {"comfyui_dir": comfyui_dir(), "pack_dir": PACK_DIR, "pack_name": PACK_NAME}
        process = subprocess.Popen([sys.executable, WORKER_SCRIPT, str(theirs.fileno()), json.dumps(paths)],
                                   pass_fds=[theirs.fileno()], env=environment)
        theirs.close()
        connection = Connection(ours.detach())
        connection.send({"comfy_args": {**comfy_args, "cuda_device": None}, "device": str(worker_device),
                         "backend": self.layout.backend, "init_method": f"tcp://127.0.0.1:{port}",
                         "rank": rank, "world_size": self.layout.degrees.world_size,
                         "degrees": (self.layout.degrees.ulysses, self.layout.degrees.ring),
                         "timeout": COLLECTIVE_TIMEOUT})
        self.processes.append(process)
        self.connections.append(connection)

    def _wait_until_ready(self):
        deadline = time.monotonic() + STARTUP_SECONDS
        for rank, (process, connection) in enumerate(zip(self.processes, self.connections), start=1):
            while not connection.poll(0.2):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise WorkerFailed(f"worker {rank} did not start: {self._worker_report(rank - 1)}")
            message = connection.recv()
            if message != "ready":
                raise WorkerFailed(f"worker {rank} did not start: {message[1]}")

    def alive(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def send(self, message):
        for connection in self.connections:
            connection.send(message)

    def ensure_replica(self, key, make_spec: Callable):
        """Sends workers rank 0's model unless they hold it already; `make_spec()` gives (spec, tensors)."""
        if self.replica_key == key:
            return
        spec, tensors = make_spec()
        self.replica_key = None
        self.send(spec)
        send_tensors(tensors, self.device)
        self.replica_key = key

    def ask(self, message) -> list:
        """Each worker's answer to `message`, in rank order."""
        self.send(message)
        return [connection.recv() for connection in self.connections]

    def drop_replica(self):
        if self.replica_key is not None and self.alive():
            self.send(DropReplica())
        self.replica_key = None

    def failure(self, error: BaseException) -> WorkerFailed:
        """What went wrong across the ranks, after tearing the pool down so nothing waits on it."""
        reports = [f"worker {rank}: {self._worker_report(rank - 1, wait=FAILURE_REPORT_SECONDS)}"
                   for rank in range(1, len(self.processes) + 1)]
        reports = [report for report in reports if not report.endswith(": running")]
        shutdown_pool(graceful=False)
        cause = "; ".join(reports) if reports else f"{type(error).__name__}: {error}"
        return WorkerFailed(f"Context Parallel failed ({cause}). The prompt was stopped; "
                            "the next prompt starts the workers again.")

    def _worker_report(self, index, wait=0.0) -> str:
        connection, process = self.connections[index], self.processes[index]
        deadline = time.monotonic() + wait
        while True:
            try:
                if connection.poll(0.05):
                    message = connection.recv()
                    if isinstance(message, tuple) and message[0] == "failed":
                        return message[1]
            except (EOFError, OSError):
                pass
            if process.poll() is not None:
                return f"exited with code {process.returncode}"
            if time.monotonic() > deadline:
                return "running"

    def shutdown(self, graceful=True):
        """Stops the workers (at once when not `graceful`: after a failure they may wait in a collective)."""
        for connection, process in zip(self.connections, self.processes):
            try:
                if graceful:
                    connection.send(Stop())
                else:
                    process.kill()
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for connection in self.connections:
            connection.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.processes, self.connections, self.groups, self.replica_key = [], [], None, None


def comfyui_dir():
    """ComfyUI's code folder (where folder_paths.py lies), for the workers' imports."""
    import folder_paths

    return os.path.dirname(os.path.abspath(folder_paths.__file__))


_active_pool: Optional[RankPool] = None


def pool_for(layout: PoolLayout) -> RankPool:
    """The process's pool for `layout`, started (or restarted) when needed."""
    global _active_pool
    if _active_pool is not None and (_active_pool.layout != layout or not _active_pool.alive()):
        shutdown_pool()
    if _active_pool is None:
        import comfy.cli_args

        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in ComfyUI's process by something else; "
                               "Context Parallel needs to start its own process group.")
        pool = RankPool(layout)
        try:
            pool.start(dict(vars(comfy.cli_args.args)))
        except BaseException:
            pool.shutdown()
            raise
        _active_pool = pool
    return _active_pool


def active_pool() -> Optional[RankPool]:
    return _active_pool


def shutdown_pool(graceful=True):
    global _active_pool
    pool, _active_pool = _active_pool, None
    if pool is not None:
        pool.shutdown(graceful)


atexit.register(shutdown_pool)
