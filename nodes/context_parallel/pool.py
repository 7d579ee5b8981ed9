"""Rank 0's side of Context Parallel: the worker processes, the process group, replicas, failures.

ComfyUI's process is rank 0. torch.distributed keeps one default process group per process, so the
process holds at most one pool of workers: a node asking for another layout replaces it. Workers
live across prompts and hold one replica; a failure anywhere tears the pool down, and the next
prompt starts a fresh one.

Ranks meet in one of two ways:
- local: the node starts one worker per extra GPU of this machine (a file store in a private folder, gloo's and
  NCCL's sockets and the control connection on loopback: nothing another machine could reach);
- env: torch.distributed's environment rendezvous (MASTER_ADDR, MASTER_PORT, WORLD_SIZE). ComfyUI
  is rank 0; the other ranks are workers started on their machines (worker.py).
Workers connect to rank 0's control listener (an authenticated connection: what to do next, and
their failures); tensors go over the process group (over the connections on CPUs).
"""
import atexit
import json
import logging
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, Listener
from typing import Callable, Optional

import psutil
import torch
import torch.distributed as dist

from ...kernels.compile.cuda_graphs import CudaGraphRecorder, ReplayedCalls
from ...kernels.context_parallel.sharding import ParallelDegrees, RankGroups, make_rank_groups
from ...kernels.context_parallel.tensor_transport import pack, send_tensors
from ...kernels.environment import environment_while
from .. import comfy_contract
from .messages import DropReplica, Stop
from .worker import MASTER_PORT_BOUND, MAX_MASTER_PORT, SECRET_VARIABLE, integer_problem

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
PACK_NAME = __name__.split(".")[0]
# Importing ComfyUI and the pack in a worker takes seconds; a cold CUDA start can take a minute.
STARTUP_SECONDS = 180
# How long a collective waits for a rank that is alive but slow (compiling its blocks, say). A
# rank that died breaks the connections at once and does not wait for this.
COLLECTIVE_TIMEOUT = timedelta(minutes=15)
FAILURE_REPORT_SECONDS = 3.0
WATCH_SECONDS = 0.5
# Where gloo and NCCL open their sockets; set to loopback for ranks of this machine.
SOCKET_INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# (NCCL_SOCKET_IFNAME,) as the process's NCCL first started, once it has.
_nccl_interface: Optional[tuple] = None


@dataclass(frozen=True)
class PoolLayout:
    degrees: ParallelDegrees
    devices: tuple  # torch device of each local rank, rank 0 first (ComfyUI's own device)
    visible_gpus: tuple  # per local rank: the CUDA_VISIBLE_DEVICES entry of its GPU ("" on CPU)
    port: int  # rank 0's control port on 127.0.0.1 for ranks of this machine, 0 for a free one
    ranks_from: str = "local"  # or "env": torch.distributed's environment, workers started by the user

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.devices[0]).type == "cuda" else "gloo"


def environment_rendezvous_problem(world_size) -> Optional[str]:
    """What is missing for ranks from torch.distributed's environment (None when all is there)."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", SECRET_VARIABLE) if not os.environ.get(name)]
    if missing:
        return (f"ranks from the environment need {', '.join(missing)} set in ComfyUI's environment "
                "(and on the workers' machines).")
    for name, low, high, why in (("WORLD_SIZE", 1, None, ""),
                                 ("MASTER_PORT", 1, MAX_MASTER_PORT, MASTER_PORT_BOUND)):
        problem = integer_problem(name, os.environ[name], low, high, why)
        if problem is not None:
            return f"{problem}; set it so in ComfyUI's environment."
    if int(os.environ["WORLD_SIZE"]) != world_size:
        return f"WORLD_SIZE is {os.environ['WORLD_SIZE']}, but the node asks for {world_size} GPUs."
    if os.environ.get("RANK", "0") != "0":
        return f"ComfyUI must be rank 0, but RANK is '{os.environ['RANK']}'."
    return None


def rendezvous_port(port: int) -> int:
    """`port` if it is free on 127.0.0.1 (any free port for 0), or a ValueError naming the fix."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise ValueError(f"port {port} is already in use ({error.strerror}); choose another port, "
                             "or 0 to pick a free one.") from error
        return probe.getsockname()[1]


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 ('lo' on Linux)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.family == socket.AF_INET and address.address.startswith("127.") for address in addresses):
            return name
    return "lo"


def claim_nccl_interface(interface: Optional[str]):
    """NCCL binds its sockets to the interface it found at the process's first communicator, whatever is set later:
    a ValueError when a pool needs another one than that."""
    global _nccl_interface
    if _nccl_interface is not None and _nccl_interface[0] != interface:
        raise ValueError("NCCL in ComfyUI's process was set up for ranks "
                         + ("of this machine (on loopback)" if _nccl_interface[0] == loopback_interface() else
                            "on several machines") + "; restart ComfyUI to switch between 'this machine' and "
                         "'environment (multi-machine)' on GPUs.")
    _nccl_interface = (interface,)


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
        self.stopping = False
        self.store_dir: Optional[str] = None  # the file store's private folder, for ranks of this machine
        self._forget_graphs()

    def _forget_graphs(self):
        """Rank 0's CUDA graphs of the replica's forwards (the workers' go with their replica)."""
        self.graphs = ReplayedCalls("Context Parallel", CudaGraphRecorder())

    def start(self, comfy_args: dict):
        world_size = self.layout.degrees.world_size
        if self.layout.ranks_from == "env":
            init_method, secret = "env://", os.environ[SECRET_VARIABLE].encode()
            control_port = int(os.environ["MASTER_PORT"]) + 1
            try:
                listener = Listener(("0.0.0.0", control_port), authkey=secret)
            except OSError as error:
                raise ValueError(f"rank 0's control port {control_port} (MASTER_PORT + 1) cannot be opened "
                                 f"({error.strerror}); choose another MASTER_PORT.") from error
        else:
            # A file store in a private folder: a TCP store would listen on every interface, unauthenticated.
            self.store_dir = tempfile.mkdtemp(prefix="fluxaccel-cp-")
            init_method = pathlib.Path(self.store_dir, "store").as_uri()
            secret = secrets.token_hex(32).encode()
            listener = Listener(("127.0.0.1", rendezvous_port(self.layout.port)), authkey=secret)
            for rank in range(1, world_size):
                self._spawn(rank, listener.address, secret)
        try:
            self._accept_workers(listener, world_size - 1)
        finally:
            listener.close()
        for rank, connection in enumerate(self.connections, start=1):
            connection.send(self._setup(rank, init_method, comfy_args))
        self._wait_until_ready()
        if self.layout.backend == "nccl":
            claim_nccl_interface(loopback_interface() if self.layout.ranks_from == "local" else
                                 os.environ.get("NCCL_SOCKET_IFNAME"))
        with environment_while(self._group_environment()):
            dist.init_process_group(self.layout.backend, init_method=init_method, rank=0,
                                    world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                                    **({"device_id": self.device} if self.device.type == "cuda" else {}))
            self.groups = make_rank_groups(self.layout.degrees)
        if self.layout.backend == "nccl":
            threading.Thread(target=self._abort_when_a_worker_dies, name="fluxaccel-cp-watch", daemon=True).start()
        logging.info("Context Parallel: %d ranks ready (Ulysses %d x ring %d, %s)", world_size,
                     self.layout.degrees.ulysses, self.layout.degrees.ring, self.layout.backend)

    def _group_environment(self) -> dict:
        """What rank 0's process groups are made under. A failed NCCL collective must raise in ComfyUI's
        process, not end it (NCCL's default on errors); for ranks of this machine, gloo's and NCCL's sockets
        on loopback. Each group reads these when it is made, so they are set only while the pack makes its
        own (NCCL keeps the interface of its first communicator for the process: claim_nccl_interface)."""
        variables = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"} if self.layout.backend == "nccl" else {}
        if self.layout.ranks_from == "local":
            variables.update(dict.fromkeys(SOCKET_INTERFACE_VARIABLES, loopback_interface()))
        return variables

    def _spawn(self, rank, control_address, secret):
        environment = {**os.environ, SECRET_VARIABLE: secret.decode(),
                       **dict.fromkeys(SOCKET_INTERFACE_VARIABLES, loopback_interface())}
        if torch.device(self.layout.devices[rank]).type == "cuda":
            environment["CUDA_VISIBLE_DEVICES"] = self.layout.visible_gpus[rank]
        local = {"comfyui_dir": comfyui_dir(), "rank": rank, "control": list(control_address)}
        self.processes.append(subprocess.Popen([sys.executable, WORKER_SCRIPT, "--local", json.dumps(local)],
                                               env=environment))

    def _accept_workers(self, listener, count):
        """The workers' connections in rank order; each worker first sends its rank."""
        accepted = {}

        def accept():
            try:
                while len(accepted) < count:
                    connection = listener.accept()
                    accepted[connection.recv()] = connection
            except (OSError, EOFError):
                pass  # the listener was closed: rank 0 stopped waiting

        waiter = threading.Thread(target=accept, name="fluxaccel-cp-accept", daemon=True)
        waiter.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while waiter.is_alive() and time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                break
            waiter.join(0.2)
        if len(accepted) < count:
            absent = [rank for rank in range(1, count + 1) if rank not in accepted]
            raise WorkerFailed(f"rank(s) {', '.join(map(str, absent))} did not connect to rank 0"
                               + ("" if self.layout.ranks_from == "local" else
                                  f" on port {int(os.environ['MASTER_PORT']) + 1}: start them with "
                                  "nodes/context_parallel/worker.py (see its description)"))
        self.connections = [accepted[rank] for rank in range(1, count + 1)]

    def _setup(self, rank, init_method, comfy_args) -> dict:
        local_gpu = self.layout.ranks_from == "local" and torch.device(self.layout.devices[rank]).type == "cuda"
        return {"comfy_args": {**comfy_args, "cuda_device": None}, "pack_name": PACK_NAME,
                # A worker started here sees only its GPU; one started elsewhere picks LOCAL_RANK's.
                "device": "cuda:0" if local_gpu else ("cpu" if self.layout.backend == "gloo" else None),
                "backend": self.layout.backend, "init_method": init_method,
                "rank": rank, "world_size": self.layout.degrees.world_size,
                # Plain values: the worker reads them before it imports the pack.
                "degrees": (self.layout.degrees.ulysses, self.layout.degrees.ring, self.layout.degrees.batch),
                "timeout": COLLECTIVE_TIMEOUT}

    def _wait_until_ready(self):
        deadline = time.monotonic() + STARTUP_SECONDS
        for index, connection in enumerate(self.connections):
            while not connection.poll(0.2):
                if self._exit_status(index) is not None or time.monotonic() > deadline:
                    raise WorkerFailed(f"worker {index + 1} did not start: {self._worker_report(index)}")
            message = connection.recv()
            if message != "ready":
                raise WorkerFailed(f"worker {index + 1} did not start: {message[1]}")

    def _exit_status(self, index) -> Optional[str]:
        """How worker `index` ended (None while it runs): its exit code here, or its connection closing."""
        if index < len(self.processes):
            code = self.processes[index].poll()
            return None if code is None else f"exited with code {code}"
        return "disconnected" if self.connections[index].closed else None

    def _abort_when_a_worker_dies(self):
        """NCCL does not notice a dead peer: rank 0 would wait in its collective until the timeout.
        Aborting the communicators makes that collective fail now (gloo sees the closed connection)."""
        while not self.stopping:
            if any(self._exit_status(index) is not None for index in range(len(self.connections))):
                if dist.is_initialized():
                    dist.distributed_c10d._abort_process_group()
                return
            time.sleep(WATCH_SECONDS)

    def alive(self) -> bool:
        return all(self._exit_status(index) is None for index in range(len(self.connections)))

    def send(self, message):
        for connection in self.connections:
            connection.send(message)

    def ensure_replica(self, key, make_spec: Callable):
        """Sends workers rank 0's model unless they hold it already; `make_spec()` gives (spec, tensors)."""
        if self.replica_key == key:
            return
        spec, tensors = make_spec()
        self.replica_key = None
        self._forget_graphs()
        self.send(spec)
        self.send_tensors(tensors)
        self.replica_key = key

    def ask(self, message) -> list:
        """Each worker's answer to `message`, in rank order."""
        self.send(message)
        return [connection.recv() for connection in self.connections]

    def send_tensors(self, tensors: list):
        """The tensors a message just sent announced, to every worker."""
        if self.layout.backend == "gloo":
            # gloo's sender can wait forever for a receiver that died mid-transfer, and tearing the
            # group down would then wait with it: on CPUs the bytes go over the workers' connections.
            for packed in pack(tensors, "cpu"):
                for connection in self.connections:
                    connection.send_bytes(packed.numpy())
        else:
            # NCCL: a worker that dies mid-transfer is caught by the watch thread, which aborts the group.
            send_tensors(tensors, self.device)

    def drop_replica(self):
        if self.replica_key is not None and self.alive():
            self.send(DropReplica())
        self.replica_key = None
        self._forget_graphs()

    def failure(self, error: BaseException) -> WorkerFailed:
        """What went wrong across the ranks, after tearing the pool down so nothing waits on it."""
        reports = [f"worker {rank}: {self._worker_report(rank - 1, wait=FAILURE_REPORT_SECONDS)}"
                   for rank in range(1, len(self.connections) + 1)]
        reports = [report for report in reports if not report.endswith(": running")]
        shutdown_pool(graceful=False)
        cause = "; ".join(reports) if reports else f"{type(error).__name__}: {error}"
        return WorkerFailed(f"Context Parallel failed ({cause}). The prompt was stopped; "
                            "the next prompt starts the workers again.")

    def _worker_report(self, index, wait=0.0) -> str:
        """What worker `index` said when it failed, or how it ended; "running" if it did neither within `wait`."""
        connection = self.connections[index]
        deadline = time.monotonic() + wait
        while True:
            try:
                if not connection.closed and connection.poll(0.05):
                    message = connection.recv()
                    if isinstance(message, tuple) and message[0] == "failed":
                        return message[1]
            except (EOFError, OSError):
                connection.close()
            status = self._exit_status(index)
            if status is not None:
                return status
            if time.monotonic() > deadline:
                return "running"

    def shutdown(self, graceful=True):
        """Stops the workers (at once when not `graceful`: after a failure they may wait in a collective)."""
        self.stopping = True
        for connection in self.connections:
            try:
                if graceful and not connection.closed:
                    connection.send(Stop())
            except OSError:
                pass
        for process in self.processes:
            if not graceful:
                process.kill()
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for connection in self.connections:
            connection.close()
        if dist.is_initialized() and not graceful and self.layout.backend == "nccl":
            # A collective may still wait for a rank that died; destroying the group would wait with it.
            dist.distributed_c10d._abort_process_group()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
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
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in ComfyUI's process by something else; "
                               "Context Parallel needs to start its own process group.")
        pool = RankPool(layout)
        try:
            pool.start(comfy_contract.cli_settings())
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
