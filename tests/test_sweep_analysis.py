"""What a sweep's report says, on hand-made trial rows: the working region and aa/v_th, the Pareto front against
a brute-force definition, the CSV and table columns, and the pictures."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import yaml

from stbp.sweep import load_sweep
from stbp.sweep.analysis import derived, is_reference, pareto_front, working_region
from stbp.sweep.plots import plot_pareto, plot_slices
from stbp.sweep.record import TrialRow
from stbp.sweep.report import compare_url, format_region, format_table, write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep():
    return load_sweep(ROOT / "sweeps" / "smoke.yaml")


@pytest.fixture
def multi():
    return load_sweep(ROOT / "sweeps" / "smoke.yaml", metric=["val_acc", "sops_per_image"])


def row(trial_id, v_th, aa, value, sops=None, status="FINISHED"):
    last = {} if value is None else {"val_acc": value}
    if sops is not None:
        last["sops_per_image"] = sops
    return TrialRow(trial_id, f"run-{trial_id}", {"v_th": v_th, "aa": aa}, status, value, 3, {}, last)


def test_the_working_region_spans_the_trials_within_90_percent_of_the_best(sweep):
    rows = [
        row("a", 0.4, 0.5, 95.0),
        row("b", 0.2, 0.3, 90.0),
        row("c", 0.8, 1.2, 86.0),
        row("d", 1.4, 0.1, 11.0),
        row("e", 0.3, 1.8, 85.4),
        row("f", 0.5, 0.5, None, status="FAILED"),
    ]
    region = working_region(rows, sweep)
    # 90% of 95 is 85.5: a, b, c are inside; e (85.4) and d are not; f has no value.
    assert (region["best"], region["threshold"], region["trials"], region["of"]) == (95.0, pytest.approx(85.5), 3, 5)
    assert region["ranges"]["v_th"] == (0.2, 0.8) and region["ranges"]["aa"] == (0.3, 1.2)
    assert region["ranges"]["aa/v_th"] == (pytest.approx(1.25), pytest.approx(1.5))  # 0.5/0.4, 0.3/0.2, 1.2/0.8
    assert sorted(region["outside"]) == ["d", "e"]
    text = format_region(region)
    assert "3 of 5 trials reach 90% of the best val_acc (95; threshold 85.5)" in text and "aa/v_th" in text


def test_a_minimised_metric_s_region_is_within_best_over_090():
    minimised = load_sweep(ROOT / "sweeps" / "smoke.yaml", metric=["val_loss"])
    rows = [row("a", 0.4, 0.5, 0.09), row("b", 0.2, 0.3, 0.099), row("c", 0.8, 1.2, 0.11)]
    region = working_region(rows, minimised)
    assert region["threshold"] == pytest.approx(0.1) and region["trials"] == 2  # 0.09 / 0.9 = 0.1


def test_aa_over_v_th_is_derived_when_both_are_searched():
    assert derived({"v_th": 0.4, "aa": 0.5}) == {"aa/v_th": 1.25}
    assert derived({"v_th": 0.4}) == {} and derived({"aa": 0.5, "lr": 0.1}) == {}
    assert is_reference(row("r", 0.4, 0.5, 1.0)) and not is_reference(row("s", 0.4, 0.6, 1.0))


def brute_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Maximise the first, minimise the second: a point is on the front if no other is >= and <= with one strict."""
    out = set()
    for name, (acc, sops) in points.items():
        if not any((a >= acc and s <= sops) and (a > acc or s < sops) for a, s in points.values()):
            out.add(name)
    return out


def test_the_pareto_front_matches_a_brute_force_definition():
    rng = random.Random(0)
    for _ in range(20):
        points = {str(i): (rng.choice([80.0, 85.0, 90.0, 95.0]), rng.choice([1e5, 2e5, 3e5])) for i in range(12)}
        rows = [row(k, 0.4, 0.5, acc, sops) for k, (acc, sops) in points.items()]
        front = pareto_front(rows, ("val_acc", "sops_per_image"), ("max", "min"))
        assert {r.trial_id for r in front} == brute_front(points)
        assert [r.last["val_acc"] for r in front] == sorted((r.last["val_acc"] for r in front), reverse=True)
    # Trials that never reported a metric are not on it.
    rows = [row("a", 0.4, 0.5, 90.0, 1e5), row("b", 0.4, 0.5, 95.0)]
    assert [r.trial_id for r in pareto_front(rows, ("val_acc", "sops_per_image"), ("max", "min"))] == ["a"]


def test_the_csv_table_and_pictures_carry_the_ratio_the_cost_and_the_front(tmp_path, multi):
    rows = [
        row("a", 0.4, 0.5, 95.0, 3e5),
        row("b", 0.8, 0.5, 93.0, 1e5),
        row("c", 0.2, 0.3, 90.0, 4e5),
        row("d", 1.4, 0.1, 11.0, 0.0),
    ]
    front = pareto_front(rows, multi.metrics, multi.modes)
    assert [r.trial_id for r in front] == ["a", "b", "d"]  # c costs more than a for less accuracy
    with open(write_csv(rows, multi, tmp_path / "t.csv", front)) as f:
        table = list(csv.DictReader(f))
    assert [t["pareto_optimal"] for t in table] == ["true", "true", "false", "true"]
    assert float(table[1]["aa_over_v_th"]) == pytest.approx(0.625) and table[1]["last_sops_per_image"] == "100000.0"
    text = format_table(rows, multi, front)
    assert text.splitlines()[0].split() == [
        "rank",
        "point",
        "v_th",
        "aa",
        "aa/v_th",
        "best",
        "val_acc",
        "sops_per_image",
        "pareto",
        "epochs",
        "status",
    ]
    assert text.splitlines()[3].split() == ["2", "b", "0.8", "0.5", "0.625", "93", "1e+05", "*", "3", "finished"]
    assert text.splitlines()[4].split() == ["3", "c", "0.2", "0.3", "1.5", "90", "4e+05", "3", "finished"]
    region = working_region(rows, multi)
    for plot, name in (
        (plot_pareto(rows, front, multi, tmp_path / "p.png"), "p.png"),
        (plot_slices(rows, multi, region, tmp_path / "s.png"), "s.png"),
    ):
        assert plot == tmp_path / name and plot.read_bytes()[:4] == b"\x89PNG"


def test_the_compare_link_lists_every_trial_for_mlflow_s_compare_page():
    from urllib.parse import unquote

    from stbp.sweep.record import SweepRecord

    record = SweepRecord("http://127.0.0.1:5005/", "7", "parent", "smoke")
    url = compare_url(record, [row("a", 0.4, 0.5, 1.0), row("b", 0.4, 0.5, 1.0)])
    assert unquote(url) == 'http://127.0.0.1:5005/#/compare-runs?runs=["run-a","run-b"]&experiments=["7"]'


# ---------------------------------------------------------------- replicates: a point is the mean of its trials


def replicate(point, rep, v_th, aa, value, sops=None, status="FINISHED"):
    r = row(f"{point}-{rep}", v_th, aa, value, sops, status)
    r.tags.update(point=point, replicate=str(rep))
    return r


def test_a_point_is_the_mean_of_its_replicates_with_their_sample_std_and_count(sweep):
    from stbp.sweep.record import by_point

    trials = [
        replicate("01", 0, 0.4, 0.5, 90.0, sops=8e6),
        replicate("01", 1, 0.4, 0.5, 94.0, sops=6e6),
        replicate("01", 2, 0.4, 0.5, None, status="FAILED"),  # diverged: left out of the mean
        replicate("02", 0, 1.4, 0.2, 11.0),
        replicate("02", 1, 1.4, 0.2, 12.0),
        replicate("02", 2, 1.4, 0.2, 13.0),
    ]
    first, second = by_point(trials, sweep)
    assert (first.trial_id, first.value, first.n, first.std["val_acc"]) == ("01", 92.0, 2, pytest.approx(8**0.5))
    assert first.last["sops_per_image"] == 7e6 and first.std["last_sops_per_image"] == pytest.approx(2e6**1 / 2**0.5)
    assert first.run_id == "run-01-1" and len(first.replicates) == 3  # the best replicate's run holds the model
    assert (second.value, second.n, second.std["val_acc"]) == (12.0, 3, pytest.approx(1.0))
    lone = by_point([row("x", 0.4, 0.5, 95.0)], sweep)[0]  # a trial recorded without a point is its own
    assert (lone.trial_id, lone.value, lone.n, lone.std["val_acc"]) == ("x", 95.0, 1, 0.0)


def test_the_csv_and_the_table_give_mean_std_and_n(tmp_path):
    from stbp.sweep.record import by_point

    data = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    data.update(scheduler="none", search={"num_samples": 4, "repeats": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    repeated = load_sweep(tmp_path / "r.yaml")
    points = by_point(
        [replicate("01", 0, 0.4, 0.5, 90.0), replicate("01", 1, 0.4, 0.5, 94.0), replicate("02", 0, 1.4, 0.2, 11.0)],
        repeated,
    )
    with open(write_csv(points, repeated, tmp_path / "t.csv")) as f:
        got = list(csv.DictReader(f))
    assert [(r["point"], float(r["best_val_acc"]), r["n"]) for r in got] == [("01", 92.0, "2"), ("02", 11.0, "1")]
    assert float(got[0]["best_val_acc_std"]) == pytest.approx(8**0.5) and float(got[1]["best_val_acc_std"]) == 0
    assert "92 ± 2.8 (n=2)" in format_table(points, repeated)


class _Inner:
    """A searcher that records what it is told: the oracle for the averaging."""

    def __init__(self, metric):
        self.metric, self.mode, self.told, self.count = metric, ["max"] * len(metric), {}, 0

    def suggest(self, trial_id):
        self.count += 1
        return {"v_th": 0.1 * self.count}

    def on_trial_complete(self, trial_id, result=None, **kwargs):
        self.told[trial_id] = result

    def save(self, path):
        Path(path).write_text(repr((self.count, self.told)))

    def restore(self, path):
        self.count, self.told = eval(Path(path).read_text())  # noqa: S307 - written by save() above


def test_the_searcher_numbers_points_repeats_them_and_sees_each_metrics_mean(tmp_path):
    from stbp.sweep.searcher import PointSearcher

    inner = _Inner(["val_acc", "sops_per_image"])
    searcher = PointSearcher(inner, repeat=2)
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [(c["v_th"], c["__point__"], c["__trial_index__"]) for c in configs] == [
        (0.1, 1, 0), (0.1, 1, 1), (0.2, 2, 0), (0.2, 2, 1),
    ]  # fmt: skip
    searcher.on_trial_complete("t0", {"val_acc": 90.0, "sops_per_image": 8.0})
    assert inner.told == {}  # one replicate is not the point's answer
    searcher.on_trial_complete("t1", {"val_acc": 94.0, "sops_per_image": 6.0})
    assert inner.told == {"t0": {"val_acc": 92.0, "sops_per_image": 7.0}}
    searcher.save(str(tmp_path / "state"))
    again = PointSearcher(_Inner(["val_acc", "sops_per_image"]), repeat=2)
    again.restore(str(tmp_path / "state"))  # a resumed sweep finishes point 2 and numbers on
    again.on_trial_complete("t2", {"val_acc": 10.0, "sops_per_image": 1.0})
    again.on_trial_complete("t3", {"val_acc": 12.0, "sops_per_image": 3.0})
    assert again.searcher.told["t2"] == {"val_acc": 11.0, "sops_per_image": 2.0}
    assert again.suggest("t4")["__point__"] == 3


def test_learned_against_fixed_pairs_every_setting_and_says_the_gain(tmp_path):
    """The learn-or-sweep comparison on hand-made points of sweeps/learn_vs_sweep_smoke.yaml: each (v_th, aa) with
    its fixed and learned point, the gain their difference, a setting tried one way only kept with a blank."""
    from stbp.sweep.compare import format_pairs, pairs, plot_pairs, switch, write_pairs_csv

    grid = load_sweep(ROOT / "sweeps" / "learn_vs_sweep_smoke.yaml")
    assert switch(grid) == "learn_v_th"

    def point(v_th, aa, learn, value, sops):
        params = {"v_th": v_th, "aa": aa, "learn_v_th": learn}
        last = {"val_acc": value, "sops_per_image": sops, **({"v_th_mean": v_th * 0.9} if learn else {})}
        return TrialRow(f"{v_th}-{aa}-{learn}", "run", params, "FINISHED", value, 3, {}, last, {"val_acc": 1.5}, 2)

    rows = [
        point(0.4, 0.5, False, 94.0, 2.0e6),
        point(0.4, 0.5, True, 93.0, 2.5e6),
        point(1.45, 0.21, False, 10.4, 0.1e6),
        point(1.45, 0.21, True, 80.0, 1.5e6),
        point(0.4, 0.21, True, 90.0, 1.9e6),
    ]
    found = pairs(rows, grid)
    assert [tuple(p.setting.values()) for p in found] == [(0.4, 0.21), (0.4, 0.5), (1.45, 0.21)]
    gains = [p.gain() for p in found]
    assert gains[0] is None and gains[1] == pytest.approx(-1.0) and gains[2] == pytest.approx(69.6)
    table = list(csv.DictReader(open(write_pairs_csv(found, grid, tmp_path / "pairs.csv"))))
    corner = table[2]
    assert (corner["v_th"], corner["aa"], corner["fixed_val_acc"], corner["learned_val_acc"]) == (
        "1.45",
        "0.21",
        "10.4",
        "80.0",
    )
    assert float(corner["val_acc_gain"]) == pytest.approx(69.6) and corner["learned_sops_per_image"] == "1500000.0"
    assert float(corner["learned_v_th_mean"]) == pytest.approx(1.305) and corner["learned_tau_mean"] == ""
    assert (table[0]["fixed_outcome"], table[0]["fixed_n"], table[0]["val_acc_gain"]) == ("not tried", "0", "")
    text = format_pairs(found, grid)
    assert "v_th=1.45  aa=0.21" in text and "80.00 ± 1.50, 1.50M SOPs, v_th -> 1.30" in text and "+69.60" in text
    region = format_region(working_region(rows, grid))
    assert "learn_v_th False, True" in region or "learn_v_th True, False" in region, region
    only_learned = [r for r in rows if r.params["learn_v_th"]]  # a region holding one value of the switch
    assert plot_slices(only_learned, grid, working_region(only_learned, grid), tmp_path / "slices.png")
    assert plot_pairs(found, grid, tmp_path / "pairs.png").stat().st_size > 10_000
    assert pairs(rows, load_sweep(ROOT / "sweeps" / "smoke.yaml")) == []  # no switch searched: no comparison
