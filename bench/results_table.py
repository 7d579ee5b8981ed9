"""The current results table, generated from the benchmark JSON in docs/results/.

Reads every benchmark report there: the rows that bench/flux.py and bench/seed_anchor.py
write (bench/report.py: "variant", "resolution", then "median_s", "first_run_s",
"peak_vram_gb", "rel_error_vs_first_variant", or "error" for a variant that failed). A report is a
file's top level, or an object inside a file that names the `command` that wrote it (a whole benchmark
run, e.g. a side-by-side kept beside probes); objects with rows but no command are probes of one
variant, often run with a lab switch, and are left out. Rows of a sweep's second pass are left out.

For each GPU, workload (system, model shapes, resolution, steps) and variant it keeps the newest
report that measured it: files by the date their name starts with, one day's files in the order git
first committed them (a file not committed yet is the newest), then by name. Speedups and the error
compare a row with ComfyUI's own variants in the same report (one machine, one process): `core-bf16`,
and the fastest of the core variants measured there; the error is the report's
rel_error_vs_first_variant where its first variant is core-bf16.

It writes the table between the markers in README.md (the headline variants at FLUX.1-dev shapes,
1024²) and the whole of docs/BENCHMARKS.md (every workload and variant).

    python -m bench.results_table          # rewrites README.md's table and docs/BENCHMARKS.md
    python -m bench.results_table --check  # exit status 1 where either is not what it would write
"""
import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(PACK_DIR, "docs", "results")
README_PATH = os.path.join(PACK_DIR, "README.md")
BENCHMARKS_PATH = os.path.join(PACK_DIR, "docs", "BENCHMARKS.md")
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
COMFYUI_SYSTEM = "ComfyUI"
CORE_BASELINE = "core-bf16"
# ComfyUI's own options in bench/flux.py: "core's fastest" is the quickest of these in a report.
CORE_VARIANTS = ("core-bf16", "core-fp8fast", "core-bf16+compile", "core-fp8fast+compile")
# What README's table shows: ComfyUI alone, its fastest option, and the pack's nodes as the shipped
# workflows chain them (workflows/), at the shapes those workflows sample.
README_WORKLOAD = (COMFYUI_SYSTEM, "flux1-dev", 1024, 28)
README_VARIANTS = (
    "core-bf16", "core-fp8fast+compile",
    "core-bf16+fluxaccel-compile", "fbc-alternate",
    "core-bf16+fluxaccel-fp8+fluxaccel-compile+fluxaccel-attention",
    "fbc-alternate+fluxaccel-fp8+fluxaccel-compile+fluxaccel-attention",
    "bc-every4+fluxaccel-fp8+fluxaccel-compile+fluxaccel-attention",
    "core-bf16+fluxaccel-fp8+fluxaccel-compile+fluxaccel-attention+fluxaccel-cp2",
)
# The shapes of reports that name no model or steps: bench/flux.py's defaults, which it ran before it had
# --model, and bench/seed_anchor.py's only model.
BENCH_FLUX_DEFAULTS = {"model": "flux1-dev", "steps": 28}
FLUX1_DEV_BLOCKS = [19, 38]
DATE_PATTERN = re.compile(r"^(\d{4}-\d{2}-\d{2})-")


class HistoryUnavailable(RuntimeError):
    """One day's result files are ordered by git history, and there is none (no checkout, or a shallow one)."""


@dataclasses.dataclass(frozen=True, eq=False)  # one object per report: hashed by identity
class Source:
    """One benchmark report: where it is, when and on what it ran."""
    file: str  # name in docs/results
    where: str  # "" for the file's top level, else the key path of the object inside it
    date: str
    order: tuple  # sorts reports oldest first
    system: str
    model: str  # bench/flux.py's --model, "(tiny)" added under --tiny
    steps: int
    device: str
    torch: str
    comfyui: str  # None where the report does not record it
    command: str  # None where the report does not record it
    rows: tuple

    @property
    def label(self) -> str:
        return self.file + (f" ({self.where})" if self.where else "")


@dataclasses.dataclass(frozen=True)
class Workload:
    system: str
    model: str
    resolution: int
    steps: int
    gpu: str


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A row with what it is compared against in its own report."""
    row: dict
    source: Source
    baseline_s: float  # core-bf16's median in the same report, or None
    fastest_core: tuple  # (variant, median) of core's fastest in the same report, or None
    error_vs_core_bf16: float  # or None


# ---------------------------------------------------------------------------------------------
# Reading the reports

def is_bench_row(row) -> bool:
    return isinstance(row, dict) and "variant" in row and "resolution" in row and ("median_s" in row or "error" in row)


def report_rows(report):
    """The report's rows: bench_report's "rows" list, or the "results" mapping of variant to row that
    bench/seed_anchor.py wrote before it shared bench/report.py (the resolution then at the top)."""
    rows = report.get("rows")
    if isinstance(rows, list) and rows and all(is_bench_row(row) for row in rows):
        return rows
    results = report.get("results")
    if isinstance(results, dict) and results and "resolution" in report:
        rows = [{"variant": variant, "resolution": report["resolution"], **row} for variant, row in results.items()]
        return rows if all(is_bench_row(row) for row in rows) else None
    return None


def found_reports(document, where="", inherited=None):
    """(key path, metadata, rows) of each report in a results file; metadata is the report's scalar
    fields over those of the objects around it (a side-by-side inside a file takes the file's device)."""
    inherited = inherited or {}
    if isinstance(document, list):
        for index, item in enumerate(document):
            yield from found_reports(item, f"{where}[{index}]", inherited)
        return
    if not isinstance(document, dict):
        return
    metadata = {**inherited, **{key: value for key, value in document.items()
                                if isinstance(value, (str, int, float, bool)) or key == "blocks"}}
    rows = report_rows(document)
    if rows is not None and (not where or "command" in document):
        yield where, metadata, rows
        return
    for key, value in document.items():
        yield from found_reports(value, f"{where}/{key}" if where else key, metadata)


def command_option(command, name):
    match = re.search(rf"--{name}[ =](\S+)", command or "")
    return match.group(1) if match else None


def first_commit_times(results_dir):
    """{file name: Unix time of the commit that added it to `results_dir`} from git history."""
    def git(*arguments):
        return subprocess.run(["git", "-C", results_dir, *arguments], capture_output=True, text=True,
                              check=True).stdout
    try:
        shallow = git("rev-parse", "--is-shallow-repository").strip() == "true"
        log = git("log", "--reverse", "--diff-filter=A", "--format=%x00%ct", "--name-only", "--", ".")
    except (OSError, subprocess.CalledProcessError) as error:
        raise HistoryUnavailable(f"{results_dir} is not in a git checkout ({error}): results_table.py orders one "
                                 "day's result files by when git first committed them; run it in a clone") from error
    if shallow:
        raise HistoryUnavailable("this clone is shallow: results_table.py orders one day's result files by when git "
                                 "first committed them; run `git fetch --unshallow` first")
    times, commit_time = {}, None
    for line in log.splitlines():
        if line.startswith("\0"):
            commit_time = int(line[1:])
        elif line:
            times.setdefault(os.path.basename(line), commit_time)
    return times


def read_sources(results_dir, commit_times):
    """Every report in `results_dir`'s JSON files, oldest first (see the module docstring)."""
    sources = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        name = os.path.basename(path)
        date = DATE_PATTERN.match(name)
        if date is None:
            raise ValueError(f"docs/results/{name}: result files are named YYYY-MM-DD-<what>.json")
        with open(path) as f:
            document = json.load(f)
        for position, (where, metadata, rows) in enumerate(found_reports(document)):
            # A file git has not committed yet is the day's newest: it is being added now.
            order = (date.group(1), commit_times.get(name, float("inf")), name, position)
            sources.append(source_of(name, where, date.group(1), order, metadata, rows))
    return sorted(sources, key=lambda source: source.order)


def source_of(name, where, date, order, metadata, rows):
    command = metadata.get("command")
    system = metadata.get("system", COMFYUI_SYSTEM)
    model = metadata.get("model") or command_option(command, "model") or BENCH_FLUX_DEFAULTS["model"]
    steps = int(metadata.get("steps") or command_option(command, "steps") or BENCH_FLUX_DEFAULTS["steps"])
    tiny = metadata.get("tiny", False) or "--tiny" in (command or "")
    if "blocks" in metadata and model == "flux1-dev" and not tiny and metadata["blocks"] != FLUX1_DEV_BLOCKS:
        raise ValueError(f"docs/results/{name} {where}: blocks {metadata['blocks']} are not FLUX.1-dev's, and the "
                         "report names no other model")
    model += " (tiny)" if tiny else ""
    rows = tuple(row for row in rows if row.get("pass", 1) == 1)
    return Source(name, where, date, order, system, model, steps, metadata["device"], metadata["torch"],
                  metadata.get("comfyui"), command, rows)


def gpu_name(device) -> str:
    """The GPU's model as torch names it ("one NVIDIA H200 (clocks ...)" in hand-written files: "NVIDIA H200")."""
    return re.sub(r"^one |\s*\(.*\)$", "", device)


def workload_of(row, source) -> Workload:
    return Workload(source.system, source.model, row["resolution"], source.steps, gpu_name(source.device))


def measurement(row, source) -> Measurement:
    timed = [r for r in source.rows if "error" not in r and r["resolution"] == row["resolution"]]
    medians = {r["variant"]: r["median_s"] for r in timed}
    core = [(variant, medians[variant]) for variant in CORE_VARIANTS if variant in medians]
    # With core-bf16 alone in the report there is no faster core option to compare with.
    fastest_core = min(core, key=lambda item: item[1]) if len(core) > 1 else None
    first_is_baseline = bool(timed) and timed[0]["variant"] == CORE_BASELINE
    return Measurement(row, source, medians.get(CORE_BASELINE), fastest_core,
                       row.get("rel_error_vs_first_variant") if first_is_baseline else None)


def current_measurements(sources):
    """{Workload: {variant: Measurement}} from the newest report that measured each."""
    current = {}
    for source in sources:  # oldest first: a newer report replaces an older one's row
        for row in source.rows:
            current.setdefault(workload_of(row, source), {})[row["variant"]] = measurement(row, source)
    return current


# ---------------------------------------------------------------------------------------------
# What a variant is

# ComfyUI's own parts of a bench/flux.py variant; a row without any of the pack's parts is ComfyUI alone.
CORE_PARTS = {"core-bf16": "bf16 weights", "core-fp8fast": "fp8_e4m3fn_fast weights", "compile": "TorchCompileModel"}
PACK_PARTS = {
    "fluxaccel-compile": "Compile FLUX",
    "fluxaccel-compile-no-cudagraphs": "Compile FLUX (cuda_graphs off)",
    "fluxaccel-fp8": "FP8 Dynamic Quantize",
    "fluxaccel-attention": "FLUX Attention Backend",
    "fbc-0": "First Block Cache's hooks, no step reused",
    "fbc-alternate": "First Block Cache, every other step reused (fixed pattern)",
    "fbc-all": "First Block Cache, every step after the first reused (fixed pattern)",
    "bc-default": "Apply Block Cache at its defaults",
}
SEED_ANCHOR_PARTS = {
    "eager": "diffusers FluxTransformer2DModel, bf16",
    "fbc-0": "para-attn First Block Cache's hooks, no step reused",
    "fbc-all": "para-attn First Block Cache, every step after the first reused",
    "fp8dq": "torchao FP8 dynamic quantization",
    "compile": "torch.compile",
}


def pack_part(part) -> str:
    if part in PACK_PARTS:
        return PACK_PARTS[part]
    if match := re.fullmatch(r"fbc-([0-9.]+)", part):
        return f"First Block Cache at threshold {match.group(1)}"
    if match := re.fullmatch(r"bc-every(\d+)(?:-o(\d))?", part):
        return f"Apply Block Cache, every {match.group(1)}th step computed, Taylor order {match.group(2) or 1}"
    if match := re.fullmatch(r"fluxaccel-cp(\d+)(?:x(\d+))?", part):
        ulysses, ring = int(match.group(1)), int(match.group(2) or 1)
        return f"Context Parallel on {ulysses * ring} GPUs (Ulysses {ulysses} x ring {ring})"
    if match := re.fullmatch(r"fluxaccel-ring(\d+)", part):
        return f"Context Parallel on {match.group(1)} GPUs (ring attention)"
    raise ValueError(f"no description for bench/flux.py's variant part {part!r}: add it to results_table.py")


def seed_anchor_part(part) -> str:
    if part in SEED_ANCHOR_PARTS:
        return SEED_ANCHOR_PARTS[part]
    if match := re.fullmatch(r"fbc-([0-9.]+)", part):
        return f"para-attn First Block Cache at threshold {match.group(1)}"
    raise ValueError(f"no description for bench/seed_anchor.py's variant part {part!r}: add it to results_table.py")


def describe(variant, system) -> str:
    """The variant in words, its parts in bench/flux.py's order; the pack's rows load bf16 weights unless
    they say otherwise."""
    parts = variant.split("+")
    if system != COMFYUI_SYSTEM:
        return " + ".join(seed_anchor_part(part) for part in parts)
    pack = [pack_part(part) for part in parts if part not in CORE_PARTS]
    if not pack:
        return "ComfyUI alone: " + " + ".join(CORE_PARTS[part] for part in parts)
    words = " + ".join(pack)
    if "core-fp8fast" in parts:
        words += ", on core's fp8_e4m3fn_fast weights"
    if "compile" in parts:
        words += ", under core's TorchCompileModel"
    return words


# ---------------------------------------------------------------------------------------------
# Markdown

TABLE_HEADER = ("| variant | s / image | vs core bf16 | vs core's fastest | first run (s) | peak VRAM (GiB) | "
                "error vs core bf16 | measured |\n|---|---|---|---|---|---|---|---|")


def ratio(baseline, seconds) -> str:
    return f"{baseline / seconds:.2f}x" if baseline else "—"


def table_line(measured: Measurement, source_number, with_ids) -> str:
    row, system = measured.row, measured.source.system
    variant = describe(row["variant"], system) + (f" `{row['variant']}`" if with_ids else "")
    measured_in = f"[{source_number}]"
    if "error" in row:
        return f"| {variant} | failed: {row['error']} | | | | | | {measured_in} |"
    if row.get("partially_loaded"):
        variant += " (partial load: weights streamed from host memory each step)"
    error = measured.error_vs_core_bf16
    fastest = measured.fastest_core[1] if measured.fastest_core else None
    return (f"| {variant} | {row['median_s']} | {ratio(measured.baseline_s, row['median_s'])} | "
            f"{ratio(fastest, row['median_s'])} | {row['first_run_s']} | {row.get('peak_vram_gb') or '—'} | "
            f"{'—' if error is None else error} | {measured_in} |")


def source_line(number, source: Source, link_prefix, fastest_core, with_command) -> str:
    comfyui = f"ComfyUI {source.comfyui}" if source.comfyui else "ComfyUI version not recorded"
    versions = f"torch {source.torch}" + (f", {comfyui}" if source.system == COMFYUI_SYSTEM else "")
    line = f"{number}. [{source.label}]({link_prefix}{source.file}): {source.date}, {source.device}, {versions}"
    if fastest_core:
        line += f"; core's fastest there: `{fastest_core[0]}`, {fastest_core[1]} s"
    return line + (f"; `{source.command}`" if with_command and source.command else "")


def workload_title(workload: Workload) -> str:
    where = "in ComfyUI" if workload.system == COMFYUI_SYSTEM else f"{workload.system}"
    return (f"{workload.gpu}: `{workload.model}` shapes, random weights, {workload.resolution}², "
            f"{workload.steps} steps, batch 1, {where}")


def workload_section(workload, measurements, link_prefix, with_ids, heading, keep_order=False):
    """A heading, the table (in the given order, or slowest first and failed rows last) and the reports
    its rows come from."""
    ordered = measurements if keep_order else sorted(
        measurements, key=lambda m: ("error" in m.row, -m.row.get("median_s", 0)))
    sources = []
    for measured in ordered:
        if measured.source not in sources:
            sources.append(measured.source)
    numbers = {source: index + 1 for index, source in enumerate(sources)}
    fastest = {m.source: m.fastest_core for m in ordered}
    lines = [f"{heading} {workload_title(workload)}", "", TABLE_HEADER]
    lines += [table_line(m, numbers[m.source], with_ids) for m in ordered]
    lines += ["", "Measured in:", ""]
    lines += [source_line(numbers[s], s, link_prefix, fastest[s], with_command=with_ids) for s in sources]
    return lines + [""]


def workload_order(workload: Workload):
    """ComfyUI before the outside anchor, then by GPU name, model, size and steps."""
    return (workload.system != COMFYUI_SYSTEM, workload.gpu, workload.model, workload.resolution, workload.steps)


COLUMNS_NOTE = (
    "The pack's rows load bf16 weights unless they say otherwise. *s / image*: median of the timed runs "
    "(random weights: the time is the model shapes', not a picture's). *vs core bf16*, *vs core's fastest*: "
    "that core variant's time in the same report (one machine start, one process) divided by the row's. "
    "*first run*: the warm-up run, compile included (a cold or a warm compile cache: see the report). "
    "*error vs core bf16*: relative L2 distance of the sampled latent from core bf16's in the same report "
    "(random weights; docs/FIDELITY*.md measure a trained model). Rows of one table may come from different "
    "days and code: each names its report.")


def readme_region(current) -> str:
    workloads = [w for w in sorted(current, key=workload_order)
                 if (w.system, w.model, w.resolution, w.steps) == README_WORKLOAD]
    lines = [README_START,
             ("<!-- Generated by bench/results_table.py from docs/results/: edit that script or add results, "
              "then run it. -->"), ""]
    for workload in workloads:
        shown = [current[workload][v] for v in README_VARIANTS if v in current[workload]]
        lines += workload_section(workload, shown, "docs/results/", with_ids=False, heading="###", keep_order=True)
    lines += [COLUMNS_NOTE + " Every variant, size and GPU measured: [docs/BENCHMARKS.md](docs/BENCHMARKS.md).",
              README_END]
    return "\n".join(lines)


def benchmarks_page(current, sources) -> str:
    lines = [
        "# Benchmarks: current results",
        "",
        "<!-- Generated by bench/results_table.py: do not edit by hand. -->",
        "",
        ("Generated by `python -m bench.results_table` from the benchmark reports in [results/](results/) (listed "
         "at the end): for each GPU, workload and variant, the newest report that measured it. The dated "
         "measurements, the commands that made them, what changed between them and what was tried and dropped "
         "are in [LAB-NOTEBOOK.md](LAB-NOTEBOOK.md)."),
        "",
        COLUMNS_NOTE,
        "",
    ]
    for workload in sorted(current, key=workload_order):
        lines += workload_section(workload, list(current[workload].values()), "results/", with_ids=True, heading="##")
    lines += ["## Reports read", "",
              "Reports of these files, oldest first (files of one day in the order git first committed them):", ""]
    lines += [f"- [{source.label}](results/{source.file})" for source in sources]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Files

def with_readme_region(readme, region) -> str:
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {README_START} ... {README_END} region for the results table")
    return readme[:start] + region + readme[end + len(README_END):]


def generated_files(results_dir=RESULTS_DIR, readme_path=README_PATH, benchmarks_path=BENCHMARKS_PATH,
                    commit_times=None):
    """{path: the text results_table.py writes there} (`commit_times`: first_commit_times' answer, read from
    git unless given)."""
    commit_times = first_commit_times(results_dir) if commit_times is None else commit_times
    sources = read_sources(results_dir, commit_times)
    current = current_measurements(sources)
    with open(readme_path) as f:
        readme = f.read()
    return {readme_path: with_readme_region(readme, readme_region(current)),
            benchmarks_path: benchmarks_page(current, sources)}


def out_of_date(files) -> list:
    """The paths whose text differs from what `files` says they should hold."""
    stale = []
    for path, text in files.items():
        try:
            with open(path) as f:
                if f.read() == text:
                    continue
        except FileNotFoundError:
            pass
        stale.append(path)
    return stale


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args()
    try:
        files = generated_files()
    except HistoryUnavailable as error:
        sys.exit(str(error))
    if args.check:
        stale = out_of_date(files)
        for path in stale:
            print(f"{os.path.relpath(path, PACK_DIR)} is not what bench/results_table.py generates: run it")
        sys.exit(1 if stale else 0)
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
