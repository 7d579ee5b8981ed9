"""Reading First Block Cache's run reports ("computed C/N steps, reused R/N") back from the log."""
import logging
import re

SUMMARY_PATTERN = re.compile(r"First Block Cache \(threshold [^)]*\): computed (\d+)/(\d+) steps, reused (\d+)/\d+")


def parse_cache_report(text):
    """(computed, total, reused) from one report line, or None if the text is no report."""
    match = SUMMARY_PATTERN.search(text)
    return tuple(int(group) for group in match.groups()) if match else None


class CacheReportRecorder(logging.Handler):
    """Collects the reports logged while it is attached to the root logger (`with CacheReportRecorder() as r`)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports = []
        self._previous_level = None

    def emit(self, record):
        report = parse_cache_report(record.getMessage())
        if report is not None:
            self.reports.append(report)

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
