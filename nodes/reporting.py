"""Showing what the pack did to the person at the graph editor."""
import logging

from . import comfy_contract


class PromptReports:
    """The reports shown on each node of the prompt being executed. The graph editor shows a node's
    latest text only, so each text sent is every report of the prompt on that node so far, one per
    line (First Block Cache's and Compile FLUX's on the same sampler), and a passing line last."""

    def __init__(self):
        self.prompt_id = None
        self.lines = {}

    def text(self, prompt_id, node_id, line, passing) -> str:
        if prompt_id != self.prompt_id:
            self.prompt_id, self.lines = prompt_id, {}
        lines = self.lines.setdefault(node_id, [])
        if passing:
            return "\n".join(lines + [line])
        lines.append(line)
        return "\n".join(lines)


_prompt_reports = PromptReports()


def report_run(summary):
    """What a node did in one sampling run: into ComfyUI's log and onto the sampler node."""
    logging.info(summary)
    report_to_sampler_node(summary)


def report_to_sampler_node(text, passing=False):
    """Shows `text` on the node being executed (the sampler) in the graph editor, when a server runs,
    below the pack's earlier reports on it in this prompt; a `passing` text (work in progress) is
    shown until the next one and not kept."""
    if "executing-context" in comfy_contract.problems():
        return
    context = comfy_contract.executing_context()
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
        server.send_progress_text(_prompt_reports.text(context.prompt_id, context.node_id, text, passing),
                                  context.node_id)
    except Exception:
        # A closed websocket must not fail a finished sampling run.
        logging.exception("could not show a report on node %s", context.node_id)
