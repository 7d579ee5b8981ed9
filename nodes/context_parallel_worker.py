"""A Context Parallel worker process. The node starts one per extra GPU; it is not run by hand.

argv: the file descriptor of its connection to rank 0, and a JSON object with ComfyUI's folder and
the pack's folder and package name. Rank 0 then sends ComfyUI's command-line options, which must
be in place before ComfyUI's modules are imported, so that this process picks the same attention,
precision and device options as ComfyUI itself.
"""
import importlib
import importlib.util
import json
import os
import sys
from multiprocessing.connection import Connection


def import_pack(pack_dir, name):
    """Imports the pack as package `name`, as ComfyUI did in rank 0, so pickled objects resolve alike."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"),
                                                  submodule_search_locations=[pack_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def main():
    connection = Connection(int(sys.argv[1]))
    paths = json.loads(sys.argv[2])
    sys.path.insert(0, paths["comfyui_dir"])
    import comfy.cli_args

    setup = connection.recv()
    vars(comfy.cli_args.args).update(setup["comfy_args"])
    import_pack(paths["pack_dir"], paths["pack_name"])
    ranks = importlib.import_module(f"{paths['pack_name']}.nodes.context_parallel_ranks")
    ranks.worker_main(connection, setup)


if __name__ == "__main__":
    main()
