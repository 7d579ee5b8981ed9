"""bench/results_table.py: README's results table and docs/BENCHMARKS.md are what it generates from
docs/results/, and it picks and compares rows as its docstring says."""
import json

import pytest

from bench import results_table


def bench_row(variant, median_s, rel_error=None, resolution=1024):
    return {"variant": variant, "resolution": resolution, "median_s": median_s, "first_run_s": 2 * median_s,
            "peak_vram_gb": 10.0, "rel_error_vs_first_variant": rel_error}


def report(*rows, **metadata):
    return {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "steps": 28, "blocks": [19, 38], **metadata,
            "rows": list(rows)}


def write_results(folder, files):
    folder.mkdir()
    for name, document in files.items():
        (folder / name).write_text(json.dumps(document))
    return folder


def current(results_dir, commit_times):
    measurements = results_table.current_measurements(results_table.read_sources(str(results_dir), commit_times))
    [workload] = [w for w in measurements if w.steps == 28]
    return measurements, measurements[workload]


def test_readme_and_benchmarks_are_what_the_script_generates():
    try:
        files = results_table.generated_files()
    except results_table.HistoryUnavailable as missing:
        pytest.skip(str(missing))
    assert results_table.out_of_date(files) == [], "run `python -m bench.results_table` and commit what it writes"


def test_the_newest_report_wins_and_is_compared_within_itself(tmp_path):
    results = write_results(tmp_path / "results", {
        "2026-01-01-first.json": report(bench_row("core-bf16", 10.0), bench_row("core-fp8fast+compile", 5.0, 0.3),
                                        bench_row("fbc-alternate", 4.0, 0.1)),
        # Committed after the next file although its name sorts first: git's order decides.
        "2026-01-02-a.json": report(bench_row("core-bf16", 8.0), bench_row("fbc-alternate", 2.0, 0.2)),
        "2026-01-02-b.json": report(bench_row("core-bf16", 9.0), bench_row("fbc-alternate", 3.0, 0.2)),
    })
    _, rows = current(results, {"2026-01-01-first.json": 1, "2026-01-02-b.json": 2, "2026-01-02-a.json": 3})
    cached = rows["fbc-alternate"]
    assert (cached.source.file, cached.row["median_s"]) == ("2026-01-02-a.json", 2.0)
    assert (cached.baseline_s, cached.error_vs_core_bf16) == (8.0, 0.2)
    # Core's fastest was measured only in the older file: the newer report has nothing to compare with.
    assert cached.fastest_core is None
    assert rows["core-fp8fast+compile"].fastest_core == ("core-fp8fast+compile", 5.0)


def test_a_report_without_core_bf16_first_has_no_error_against_it(tmp_path):
    results = write_results(tmp_path / "results", {
        "2026-01-01-x.json": report(bench_row("fbc-alternate", 4.0), bench_row("core-bf16", 8.0, 0.1)),
    })
    _, rows = current(results, {})
    assert rows["core-bf16"].error_vs_core_bf16 is None
    assert "| 2.00x |" in results_table.table_line(rows["fbc-alternate"], 1, with_ids=False)


def test_only_reports_that_name_their_command_are_read_inside_a_file(tmp_path):
    side_by_side = {"command": "python3 -m bench.flux --steps 4 --variants core-bf16",
                    "rows": [bench_row("core-bf16", 1.0)]}
    lab_probe = report(bench_row("core-bf16", 0.5))
    results = write_results(tmp_path / "results", {
        "2026-01-01-x.json": {"device": "one NVIDIA H200 (clocks.max.sm 1980 MHz)", "torch": "2.11.0+cu130",
                              "side_by_side": side_by_side, "probe_with_a_lab_switch": lab_probe},
    })
    measurements = results_table.current_measurements(results_table.read_sources(str(results), {}))
    [(workload, rows)] = measurements.items()
    assert (workload.gpu, workload.steps, rows["core-bf16"].row["median_s"]) == ("NVIDIA H200", 4, 1.0)


def test_a_failed_variant_shows_its_error(tmp_path):
    failed = {"variant": "core-bf16+fluxaccel-cp2", "resolution": 1024, "error": "out of memory: OutOfMemoryError"}
    results = write_results(tmp_path / "results", {"2026-01-01-x.json": report(bench_row("core-bf16", 8.0), failed)})
    _, rows = current(results, {})
    line = results_table.table_line(rows["core-bf16+fluxaccel-cp2"], 1, with_ids=True)
    assert "Context Parallel on 2 GPUs" in line and "failed: out of memory: OutOfMemoryError" in line


def test_check_names_a_file_until_it_is_written(tmp_path):
    results = write_results(tmp_path / "results", {"2026-01-01-x.json": report(bench_row("core-bf16", 8.0))})
    readme = tmp_path / "README.md"
    readme.write_text(f"# pack\n\n{results_table.README_START}\nold table\n{results_table.README_END}\n\n## Next\n")
    benchmarks = tmp_path / "BENCHMARKS.md"
    files = results_table.generated_files(str(results), str(readme), str(benchmarks), commit_times={})
    assert sorted(results_table.out_of_date(files)) == sorted([str(readme), str(benchmarks)])
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
    assert results_table.out_of_date(files) == []
    written = readme.read_text()
    assert written.startswith("# pack\n\n") and written.endswith("\n\n## Next\n") and "old table" not in written
    assert "| ComfyUI alone: bf16 weights | 8.0 | 1.00x |" in written
