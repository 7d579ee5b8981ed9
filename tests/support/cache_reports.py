"""Reading the pack's per-run reports back from the log: First Block Cache's and Block Cache's
"computed C/N steps, reused R/N", Compile FLUX's "N graphs compiled this run" and what its CUDA graphs did."""
import logging
import re

SUMMARY_PATTERN = re.compile(r"Block Cache \([^)]*\): computed (\d+)/(\d+) steps, reused (\d+)/\d+")
CALIBRATED_PATTERN = re.compile(r"Block Cache \([^)]*, threshold ([0-9.]+) calibrated ")
COMPILE_PATTERN = re.compile(r"Compile FLUX: (?:(\d+) graphs? compiled|no graph compiled)")


def parse_cache_report(text):
    """(computed, total, reused) from one report line, or None if the text is no report."""
    match = SUMMARY_PATTERN.search(text)
    return tuple(int(group) for group in match.groups()) if match else None


def parse_calibrated_threshold(text):
    """The threshold a Block Cache report line says its quality target was calibrated to, or None."""
    match = CALIBRATED_PATTERN.search(text)
    return float(match.group(1)) if match else None


def cuda_graphs_report(text):
    """What a Compile FLUX report line says its CUDA graphs did ("26 of 28 model calls replayed ...",
    "CUDA graphs not used: ..."), or None if the text is no such report."""
    if parse_compile_report(text) is None or "; " not in text:
        return None
    return text.partition("; ")[2]


def parse_compile_report(text):
    """Graphs compiled in the run one Compile FLUX report line describes, or None if it is no report."""
    match = COMPILE_PATTERN.search(text)
    if match is None:
        return None
    return int(match.group(1) or 0)


class CacheReportRecorder(logging.Handler):
    """Collects the reports logged while it is attached to the root logger (`with CacheReportRecorder() as r`):
    `reports` from the cache nodes, `calibrated_thresholds` from Block Cache's quality targets,
    `graphs_compiled` and `cuda_graphs` from Compile FLUX, one entry per sampling run; `report_lines`, the
    cache nodes' report lines as the sampler node shows them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports = []
        self.report_lines = []
        self.calibrated_thresholds = []
        self.graphs_compiled = []
        self.cuda_graphs = []
        self._previous_level = None

    def emit(self, record):
        message = record.getMessage()
        report = parse_cache_report(message)
        if report is not None:
            self.reports.append(report)
            self.report_lines.append(message)
        threshold = parse_calibrated_threshold(message)
        if threshold is not None:
            self.calibrated_thresholds.append(threshold)
        graphs = parse_compile_report(message)
        if graphs is not None:
            self.graphs_compiled.append(graphs)
        replayed = cuda_graphs_report(message)
        if replayed is not None:
            self.cuda_graphs.append(replayed)

    def __enter__(self):
        root = logging.getLogger()
        self._previous_level = root.level
        root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
        root.addHandler(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._previous_level)
