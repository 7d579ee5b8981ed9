"""The report both benchmarks write (bench/flux.py in ComfyUI, bench/seed_anchor.py outside it).

A report is the caller's metadata (at least "steps"; bench/flux.py adds "comfyui", the ComfyUI version,
which bench/results_table.py shows), a "rows" list and, computed here from the rows,
"fbc_step_costs". Each row is one variant at one resolution: "variant", "resolution", then either
the timings (median_s, times_s, first_run_s, peak_vram_gb, steps_reused, rel_error_vs_first_variant,
and where Compile FLUX ran, graphs_compiled [in the warm-up run, in the timed runs] and the sweep's
"pass"; bench/flux.py adds "model", and "partially_loaded" where ComfyUI left weights in host memory;
speedup_vs_first_variant is added here) or, for a variant that failed, "error". Same rows in both
scripts, so their JSONs tabulate together.
"""
import json

TABLE_HEADER = [
    "| variant | resolution | warm median (s) | speedup | first run (s) | peak VRAM (GB) | steps reused | "
    "rel. error vs first | graphs compiled (warm-up, timed) |",
    "|---|---|---|---|---|---|---|---|---|",
]


def timed_rows(rows):
    return [row for row in rows if "error" not in row]


def add_speedups(rows):
    """speedup_vs_first_variant: against the first timed row at the same resolution."""
    baselines = {}
    for row in timed_rows(rows):
        baseline = baselines.setdefault(row["resolution"], row["median_s"])
        row["speedup_vs_first_variant"] = round(baseline / row["median_s"], 2)


def step_costs(rows, steps):
    """Seconds per computed and per reused step, per resolution, from the fixed-pattern cache variants.

    fbc-0 computes every step; fbc-all reuses `steps_reused` steps and computes the rest, so its time
    less the computed steps' is what its reused steps cost.
    """
    by_key = {(row["variant"], row["resolution"]): row for row in timed_rows(rows)}
    costs = {}
    for (variant, resolution), none_reused in by_key.items():
        all_reused = by_key.get(("fbc-all", resolution))
        # Without a reused step (e.g. a 1-step run) there is nothing to divide by.
        if variant != "fbc-0" or all_reused is None or not all_reused["steps_reused"]:
            continue
        computed = none_reused["median_s"] / steps
        reused_steps = all_reused["steps_reused"]
        reused = (all_reused["median_s"] - (steps - reused_steps) * computed) / reused_steps
        costs[resolution] = {"per_computed_step_s": round(computed, 4), "per_reused_step_s": round(reused, 4)}
    return costs


def table_row(row, steps):
    resolution = f"{row['resolution']}²" + (f" (pass {row['pass']})" if row.get("pass", 1) > 1 else "")
    if "error" in row:
        return f"| {row['variant']} | {resolution} | failed: {row['error']} | | | | | | |"
    graphs = row.get("graphs_compiled")
    variant = row["variant"]
    if row.get("partially_loaded"):
        # ComfyUI streamed the weights it could not keep on the GPU each step: not a like-for-like time.
        variant += f" (partial load: {row.get('weights_on_gpu_gb')} of {row.get('weights_gb')} GB on the GPU)"
    return (f"| {variant} | {resolution} | {row['median_s']} | {row['speedup_vs_first_variant']}× | "
            f"{row['first_run_s']} | {row['peak_vram_gb']} | {row['steps_reused']}/{steps} | "
            f"{row['rel_error_vs_first_variant']} | {', '.join(map(str, graphs)) if graphs else ''} |")


def markdown_table(report, title):
    """`title` (the caller's one-line description of the set-up), the rows, then the step costs."""
    lines = [title, "", *TABLE_HEADER]
    lines += [table_row(row, report["steps"]) for row in report["rows"]]
    for resolution, costs in report["fbc_step_costs"].items():
        lines += ["", f"First Block Cache at {resolution}²: {costs['per_computed_step_s']} s per computed step, "
                      f"{costs['per_reused_step_s']} s per reused step."]
    return "\n".join(lines) + "\n"


def update_report(report, title, json_path, markdown_path):
    """Recomputes speedups and step costs from the rows so far and rewrites the files given (None: skipped).

    Called after every variant, so a run stopped at its time limit still leaves its data.
    """
    add_speedups(report["rows"])
    report["fbc_step_costs"] = step_costs(report["rows"], report["steps"])
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown_table(report, title))
