"""What the sampler node shows: every report of the prompt on it, one per line (the editor shows a node's latest text)."""
from fluxaccel.nodes.reporting import PromptReports


def test_each_text_holds_the_prompts_reports_on_the_node_and_a_passing_line_last():
    reports = PromptReports()
    assert reports.text("p1", "sampler", "Compile FLUX: compiling graph 1 ...", passing=True) == \
        "Compile FLUX: compiling graph 1 ..."
    assert reports.text("p1", "sampler", "First Block Cache: computed 3/6", passing=False) == \
        "First Block Cache: computed 3/6"
    assert reports.text("p1", "other", "FP8 Dynamic Quantize: ...", passing=False) == "FP8 Dynamic Quantize: ..."
    assert reports.text("p1", "sampler", "Compile FLUX: no graph compiled", passing=False) == \
        "First Block Cache: computed 3/6\nCompile FLUX: no graph compiled"


def test_a_new_prompt_starts_from_no_reports():
    reports = PromptReports()
    reports.text("p1", "sampler", "First Block Cache: computed 3/6", passing=False)
    assert reports.text("p2", "sampler", "First Block Cache: computed 6/6", passing=False) == \
        "First Block Cache: computed 6/6"
