"""A Context Parallel worker process: one per GPU beyond ComfyUI's own.

On ComfyUI's machine the node starts them; the argument is a JSON object (ComfyUI's folder, the
control address, the rank) and the connection secret comes in FLUXACCEL_CP_SECRET.

On other machines (the node's `ranks` = env) start one per GPU yourself, with ComfyUI and this pack
installed as on rank 0 and torch.distributed's environment variables:

    MASTER_ADDR=<rank 0's address> MASTER_PORT=29500 WORLD_SIZE=4 RANK=2 LOCAL_RANK=0 \\
    FLUXACCEL_CP_SECRET=<as ComfyUI's> python custom_nodes/<pack>/nodes/context_parallel/worker.py \\
        --comfyui /path/to/ComfyUI

It connects to rank 0's control port (MASTER_PORT + 1), waiting until ComfyUI first samples with
the node, then serves until that session ends (a failure, another layout, ComfyUI exiting): run it
in a loop to serve the next. Rank 0 sends ComfyUI's command-line options, put in place before
ComfyUI's modules are imported, so every rank picks the same attention and precision options.
"""
import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from multiprocessing.connection import Client
from typing import Optional

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET_VARIABLE = "FLUXACCEL_CP_SECRET"
CONNECT_RETRY_SECONDS = 1.0
# MASTER_PORT + 1 is rank 0's control port, which must be a port too.
MAX_MASTER_PORT = 65534
MASTER_PORT_BOUND = " (MASTER_PORT + 1 is rank 0's control port)"


def import_pack(name):
    """Imports this pack as package `name`, rank 0's name for it, so pickled objects resolve alike."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(PACK_DIR, "__init__.py"),
                                                  submodule_search_locations=[PACK_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def connect(address, secret, wait_seconds):
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return Client(address, authkey=secret)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(CONNECT_RETRY_SECONDS)


def environment_text(name) -> str:
    """A variable this worker needs, or an exit naming it."""
    value = os.environ.get(name)
    if not value:
        sys.exit(f"nodes/context_parallel/worker.py: {name} is not set; set it as described in this script's --help.")
    return value


def integer_problem(name, value, low, high=None, why="") -> Optional[str]:
    """What is wrong with `value` of environment variable `name` as an integer from `low` to `high`
    (None when nothing); `why` says what the bounds are for. Rank 0's checks use it too."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is not None and number >= low and (high is None or number <= high):
        return None
    bounds = f"from {low} to {high}" if high is not None else f"of {low} or more"
    return f"{name} must be an integer {bounds}{why}, not '{value}'"


def environment_integer(name, low, high=None, why="") -> int:
    """An integer variable from `low` to `high`, or an exit naming the variable and its value."""
    value = environment_text(name)
    problem = integer_problem(name, value, low, high, why)
    if problem is not None:
        sys.exit(f"nodes/context_parallel/worker.py: {problem}.")
    return int(value)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", help="ComfyUI's folder on this machine (a worker you start)")
    parser.add_argument("--wait", type=float, default=24 * 3600.0,
                        help="seconds to wait for ComfyUI's control port (a worker you start)")
    parser.add_argument("--local", help=argparse.SUPPRESS)  # JSON from the node that started this worker
    return parser.parse_args()


def main():
    args = parse_args()
    if args.local is not None:
        local = json.loads(args.local)
        comfyui_dir, rank, address, wait = local["comfyui_dir"], local["rank"], tuple(local["control"]), 60.0
    else:
        comfyui_dir, rank = args.comfyui, environment_integer("RANK", 1, why=" (ComfyUI is rank 0)")
        control_port = environment_integer("MASTER_PORT", 1, MAX_MASTER_PORT, MASTER_PORT_BOUND) + 1
        address, wait = (environment_text("MASTER_ADDR"), control_port), args.wait
        environment_text(SECRET_VARIABLE)
        if "LOCAL_RANK" in os.environ:
            environment_integer("LOCAL_RANK", 0)  # the GPU worker_main picks
    connection = connect(address, os.environ[SECRET_VARIABLE].encode(), wait)
    connection.send(rank)
    sys.path.insert(0, comfyui_dir)
    setup = connection.recv()
    import_pack(setup["pack_name"])
    # Before anything imports ComfyUI's modules that read its settings at import.
    importlib.import_module(f"{setup['pack_name']}.nodes.comfy_contract").apply_cli_settings(setup["comfy_args"])
    serving = importlib.import_module(f"{setup['pack_name']}.nodes.context_parallel.serving")
    serving.worker_main(connection, setup)


if __name__ == "__main__":
    main()
