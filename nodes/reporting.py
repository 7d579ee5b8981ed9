"""Showing what the pack did to the person at the graph editor."""
import logging

from comfy_execution.utils import get_executing_context


def report_run(summary):
    """What a node did in one sampling run: into ComfyUI's log and onto the sampler node."""
    logging.info(summary)
    report_to_sampler_node(summary)


def report_to_sampler_node(text):
    """Shows `text` on the node being executed (the sampler) in the graph editor, when a server runs."""
    context = get_executing_context()
    if context is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    try:
        server.send_progress_text(text, context.node_id)
    except Exception:
        # A closed websocket must not fail a finished sampling run.
        logging.exception("could not show a report on node %s", context.node_id)
