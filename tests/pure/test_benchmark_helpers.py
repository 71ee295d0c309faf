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
    assert "| 1 | 2 | 0.500 | 0.500 | 1.50 |" in text  # mean 2 (4 significant digits), spread 1/2, relative, best time
    assert "| 1 probe(s) | 7.00 | 3.50 |" in text and "| none | 2.00 | 1.00 |" in text


@pytest.fixture(scope="module")
def toy2():
    sys.path.insert(0, os.path.join(PACK, "scripts"))
    return importlib.import_module("bench.two_controls")  # its data helpers import torch only


def test_two_controls_squares_do_not_overlap_and_render_with_their_labels(toy2):
    import torch

    pos = toy2.square_positions(20, 2, seed=4)
    assert pos.shape == (20, 2, 2) and int(pos.min()) >= 0 and int(pos.max()) <= toy2.LATENT - toy2.SIDE
    assert bool(((pos[:, 0] - pos[:, 1]).abs().amax(1) >= toy2.SIDE).all())
    assert torch.equal(pos, toy2.square_positions(20, 2, seed=4))
    latents, labels = toy2.render(pos[:1])
    (y0, x0), (y1, x1) = pos[0].tolist()
    s, px = toy2.SIDE, toy2.PX
    assert float(latents[0, 0].sum()) == 2 * s * s and float(latents[0, 1].sum()) == -2 * s * s
    assert float(latents[0, 2:].abs().sum()) == 0
    assert int(labels[0, y1 * px, x1 * px]) == 2 and int(labels[0, y0 * px + s * px - 1, x0 * px]) == 1
    assert int((labels[0] == 1).sum()) == (s * px) ** 2 and int((labels[0] == 0).sum()) == (toy2.LATENT * px) ** 2 - 2 * (s * px) ** 2


def test_two_controls_conditions_fill_or_outline_the_squares(toy2):
    pos = toy2.square_positions(1, 1, seed=0)
    _, labels = toy2.render(pos)
    fill, outline = toy2.condition(labels, "A"), toy2.condition(labels, "B")
    side, band = toy2.SIDE * toy2.PX, toy2.PX // 2
    assert fill.shape == (1, toy2.LATENT * toy2.PX, toy2.LATENT * toy2.PX, 3)
    assert float(fill.sum()) == 3 * side * side
    assert float(outline.sum()) == 3 * (side * side - (side - 2 * band) ** 2)
    assert bool((outline <= fill).all())


def test_two_controls_presence_is_one_for_the_data_and_zero_when_flat(toy2):
    import torch

    pos = toy2.square_positions(3, 2, seed=1)
    latents, _ = toy2.render(pos)
    assert torch.allclose(toy2.presence(latents, pos[:, 1]), torch.ones(3))
    assert torch.allclose(toy2.presence(torch.zeros_like(latents), pos[:, 0]), torch.zeros(3))
    half = latents.clone()
    half[:, 1] = 0
    assert torch.allclose(toy2.presence(half, pos[:, 0]), torch.full((3,), 0.5))


def test_two_controls_verdicts_compare_the_right_runs(toy2):
    plain, stage1, recipe = toy2.RUNS

    def row(alone, summed, balanced, asym, relative=0.5):
        return {("alone", "A"): alone, ("alone", "B"): alone[::-1], "sum": summed, "balanced": balanced,
                ("asym", "A"): (asym, relative), ("asym", "B"): (asym, relative)}

    rows = {(0, plain): row([0.9, 0.0], [0.3, 0.2], [0.9, 0.9], 5.0),
            (0, stage1): row([0.8, 0.1], [0.9, 0.9], [0.9, 0.9], 2.0, 0.6),
            (0, recipe): row([0.7, 0.1], [0.9, 0.9], [0.5, 0.4], 1.0, 0.4)}
    (two, _, verdict2), (cons_a, numbers, verdict_a), (cons_b, _, verdict_b) = toy2.claims(rows, [0])
    # 0.5 > 0.3, 0.4 > 0.2; Asym 1 < 2 (not plain's 5) and relative 0.4 < 0.6, for each control
    assert verdict2 == verdict_a == verdict_b == "reproduced" and "control A" in cons_a and "control B" in cons_b
    assert "0.700 vs 0.800" in numbers  # the stage's cost: recipe alone vs stage 1 alone
    rows[0, recipe][("asym", "B")] = (1.0, 0.7)  # lower Asym, but only because B got weaker
    assert toy2.claims(rows, [0])[2][2].startswith("only as a weaker control")
    rows[0, recipe]["balanced"] = [0.5, 0.1]
    rows[0, recipe][("asym", "A")] = (3.0, 0.5)
    rows[0, recipe][("asym", "B")] = (3.0, 0.5)
    assert [c[2] for c in toy2.claims(rows, [0])] == ["not reproduced"] * 3
