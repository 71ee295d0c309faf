"""Pure helpers of the benchmark (scripts/bench/stats.py): run order, medians, ratios, target
checks, tables; the report's generated blocks."""
import importlib
import importlib.util
import os
import sys

import pytest

PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bm():
    sys.path.insert(0, os.path.join(PACK, "scripts"))
    return importlib.import_module("bench.stats")  # imports no ComfyUI and no torch


def test_interleaved_order_runs_every_configuration_once_per_repeat(bm):
    assert bm.interleaved(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]
    assert bm.interleaved(["a"], 0) == []


def test_median_ignores_missing_values(bm):
    assert bm.median([3.0, 1.0, 2.0]) == 2.0
    assert bm.median([4.0, None, 1.0]) == 2.5
    assert bm.median([]) is None and bm.median([None]) is None


def test_ratio_and_overhead(bm):
    assert bm.ratio(3.0, 2.0) == 1.5
    assert bm.ratio(None, 2.0) is None and bm.ratio(1.0, 0) is None
    assert bm.overhead(1.25) == pytest.approx(0.25) and bm.overhead(None) is None


def test_controlnext_floor_target(bm):
    holds, rel = bm.check_cnx_floor(1.10, 1.05)
    assert holds and rel == pytest.approx(1.10 / 1.05)
    assert bm.check_cnx_floor(1.25, 1.05)[0] is False
    assert bm.check_cnx_floor(None, 1.05) == (None, None)


def test_xs_target_compares_overheads_not_ratios(bm):
    holds, rel = bm.check_xs_vs_cn(1.2, 1.5)  # 0.2 vs 0.5 -> 0.4 of it
    assert holds and rel == pytest.approx(0.4)
    assert bm.check_xs_vs_cn(1.3, 1.5)[0] is False  # 0.6 of it
    assert bm.check_xs_vs_cn(1.1, 0.99) == (None, None)  # no ControlNet overhead to compare with


def test_mi_target(bm):
    assert bm.check_mi_vs_sum(10.2, 10.0) == (True, pytest.approx(1.02))
    assert bm.check_mi_vs_sum(10.5, 10.0)[0] is False
    assert bm.verdict(True) == "**holds**" and bm.verdict(False) == "**missed**" and bm.verdict(None) == "not measured"


def test_markdown_table_and_number_format(bm):
    table = bm.md_table(["a", "b"], [[1, "x|y"], ["n/a", 2]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| n/a | 2 |"]
    assert bm.fmt(1.23456) == "1.235" and bm.fmt(None) == "n/a" and bm.fmt(float("nan")) == "n/a"
    assert bm.fmt(2.0, 1, " s") == "2.0 s"


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("xctrl_benchmark_script", os.path.join(PACK, "scripts", "benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports no ComfyUI and no torch at module level
    return mod


def test_arguments_quick_defaults_and_validation(cli, tmp_path):
    bm = cli
    a = bm.parse_args(["--comfyui", str(tmp_path), "--quick"])
    assert (a.repeats, a.frames, a.pre_frames, a.sdxl_controlnet, a.sdxl_cn2) == (1, 2, 1, "off", False)
    a = bm.parse_args(["--comfyui", str(tmp_path)])
    assert (a.repeats, a.frames, a.pre_frames, a.sdxl_controlnet, a.sdxl_cn2) == (3, 4, 2, "auto", True)
    a = bm.parse_args(["--comfyui", str(tmp_path), "--only", "sd15,pre", "--repeats", "5"])
    assert a.families == ["sd15", "pre"] and a.repeats == 5 and a.steps == 1
    with pytest.raises(SystemExit):
        bm.parse_args(["--comfyui", str(tmp_path), "--only", "sd99"])


def test_spread_of_repeats(bm):
    assert bm.spread([10.0, 11.0, 12.0]) == pytest.approx(100 * 2 / 11)
    assert bm.spread([5.0]) is None and bm.spread([]) is None


def test_report_blocks_replace_only_their_own_text(tmp_path):
    sys.path.insert(0, os.path.join(PACK, "scripts"))
    report = importlib.import_module("bench.report")
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nhand-written intro\n")
    report.replace_block(str(path), "main", "table v1")
    report.replace_block(str(path), "long_video", "lv v1")
    text = path.read_text().replace("<!-- /generated:main -->", "<!-- /generated:main -->\n\nhand-written reading")
    path.write_text(text)
    report.replace_block(str(path), "main", "table v2")
    out = path.read_text()
    assert "hand-written intro" in out and "hand-written reading" in out and "lv v1" in out
    assert "table v2" in out and "table v1" not in out
    assert out.index("table v2") < out.index("lv v1")


def test_asymmetry_report_renders_its_numbers():
    import types

    sys.path.insert(0, os.path.join(PACK, "scripts"))
    asym = importlib.import_module("bench.asymmetry")
    bench = types.SimpleNamespace(machine={"CPU": "x"}, argv=["benchmark.py"], asymmetry={
        "size": 128, "rows": [{"probes": 1, "asym": [1.0, 3.0, 2.0], "relative": [0.5] * 3, "seconds": [2.0, 1.5, 3.0]}],
        "stage": [{"probes": 0, "seconds_per_step": 2.0}, {"probes": 1, "seconds_per_step": 7.0}]})
    text = asym.asymmetry_report(bench)
    assert "| 1 | 2.0000 | 0.500 | 0.500 | 1.50 |" in text  # mean 2, spread 1/2, relative, best time
    assert "| 1 probe(s) | 7.00 | 3.50 |" in text and "| none | 2.00 | 1.00 |" in text
