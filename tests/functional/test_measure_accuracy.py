"""measure_record against LUDB's cardiologists on every LUDB record in the repository.

The in-sample numbers are bench/accuracy.py's and the out-of-fold ones bench/folds.py's
(loaded from the files, so the benches and this test cannot drift apart): out of fold the
issue's aims are asserted where met, and where not the figure reached with a margin
(folds.LIMITS), the gap stated in README.md. Also: the LUDB reader and the reference
definition, checked on hand-made input.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from device_agent.clinical.measurements import MEASUREMENT_NAMES
from device_agent.lab import ludb
from tests.conftest import REPO
from tests.helpers import load_bench

LUDB = REPO / "tests" / "data" / "ludb"
# The cardiologists' axis labels overlap in angle (see test_axis_labels_cap_any_angle_rule),
# so the 85 % is out of reach for any angle-to-label rule; this is what we keep:
# 77 of 96 today (80 %), and 36 and 37 of 48 on each half with cut-offs fitted on the other.
AXIS_AGREEMENT_MIN = 0.80
AXIS_CROSS_VALIDATED_MIN = 0.74
AXIS_AIM = 0.85


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_bench()


@pytest.fixture(scope="module")
def results(bench):
    if not (LUDB / "ludb.csv").is_file():
        pytest.fail(f"LUDB records not found at {LUDB}: the checkout is incomplete")
    found = bench.evaluate(LUDB)
    assert len(found) == len(ludb.record_ids(LUDB)) == 100
    return found


@pytest.mark.parametrize("name", ["pr_ms", "qrs_ms", "qt_ms"])
def test_interval_accuracy_meets_the_aims(bench, results, name):
    stats = bench.interval_stats(results, name)
    aim_mean, aim_sd = bench.AIMS[name]
    assert stats["coverage"] >= bench.MIN_COVERAGE, stats
    assert abs(stats["mean"]) <= aim_mean, stats
    assert stats["sd"] <= aim_sd, stats


def test_heart_rate_within_3_bpm(bench, results):
    regular = bench.heart_rate_stats(results, regular_only=True)
    assert regular["n"] == regular["with_reference"] >= 80
    assert regular["max_abs"] <= bench.HR_TOLERANCE_BPM, regular
    every = bench.heart_rate_stats(results)
    assert every["n"] == every["with_reference"] == 100
    assert every["mean_abs"] <= 1.0, every
    # irregular rhythms: the unmarked first and last beats give the marked span its own rate
    assert every["within"] >= 0.95 * every["n"], every


def test_qrs_axis_category_agreement(bench, results):
    stats = bench.axis_stats(results)
    assert stats["measured"] >= 0.95 * stats["labelled"], stats
    assert stats["agreement"] >= AXIS_AGREEMENT_MIN, stats


def test_fitted_axis_cutoffs_hold_on_records_they_were_not_fitted_to(bench, results):
    """Cut-offs fitted on alternate records, scored on the others: the angle, not the fit."""
    halves = bench.axis_cross_validated(results)
    assert len(halves) == 2 and sum(h["labelled"] for h in halves) == 96
    for half in halves:
        assert half["agreement"] >= AXIS_CROSS_VALIDATED_MIN, half


def test_textbook_axis_cutoffs_agree_less_than_the_fitted_ones(bench, results):
    """The Russian school's textbook cut-offs, for comparison: the labels do not follow them."""
    book = bench.axis_stats(results, ludb.TEXTBOOK_AXIS_CATEGORIES)
    assert [n for n, _ in ludb.TEXTBOOK_AXIS_CATEGORIES] == [n for n, _ in ludb.AXIS_CATEGORIES]
    assert book["measured"] == bench.axis_stats(results)["measured"]
    assert 0.5 <= book["agreement"] < bench.axis_stats(results)["agreement"], book


def test_axis_confusions_count_every_disagreement(bench, results):
    stats = bench.axis_stats(results)
    confusions = bench.axis_confusions(results)
    assert sum(n for _, _, n in confusions) == stats["measured"] - stats["hits"]
    assert all(label != got for label, got, _ in confusions)
    assert [n for _, _, n in confusions] == sorted((n for _, _, n in confusions), reverse=True)


def test_axis_labels_cap_any_angle_rule(bench, results):
    """No rule cutting the measured angle into the five labels in order reaches the aim."""
    ceiling = bench.axis_ceiling(results)
    assert bench.axis_stats(results)["agreement"] <= ceiling < AXIS_AIM, ceiling


def test_axis_ceiling_is_the_best_rule_on_a_small_case(bench):
    """The ceiling's dynamic programme against brute force over every cut."""
    import itertools
    from types import SimpleNamespace

    order = [name for name, _ in ludb.AXIS_CATEGORIES]
    rng = np.random.default_rng(5)
    angles = np.sort(rng.uniform(-60, 120, 9))
    labels = rng.integers(0, 5, 9)
    fake = [SimpleNamespace(measured=SimpleNamespace(qrs_axis_deg=float(a)),
                            labels=SimpleNamespace(axis=order[k]))
            for a, k in zip(angles, labels, strict=True)]
    brute = max(
        sum(int(np.searchsorted(cuts, i, side="right")) == k for i, k in enumerate(labels))
        for cuts in itertools.combinations_with_replacement(np.arange(10) - 0.5, 4)
    ) / 9
    assert bench.axis_ceiling(fake) == pytest.approx(brute)
    cuts, hits = bench.fit_axis_cuts([(float(a), order[k]) for a, k in zip(angles, labels,
                                                                         strict=True)])
    assert hits == round(brute * 9)
    assert sum(ludb.axis_category(float(a), cuts) == order[k]
               for a, k in zip(angles, labels, strict=True)) == hits


def test_fitted_axis_cutoffs_keep_equal_angles_together(bench):
    order = [name for name, _ in ludb.AXIS_CATEGORIES]
    pairs = [(10.0, order[0]), (10.0, order[1]), (10.0, order[1]), (50.0, order[2])]
    cuts, hits = bench.fit_axis_cuts(pairs)
    assert hits == 3
    assert [ludb.axis_category(a, cuts) for a, _ in pairs] == [order[1]] * 3 + [order[2]]


def test_reasons_exactly_for_the_missing_values(results):
    for r in results:
        missing = {name for name in MEASUREMENT_NAMES if r.measured.value(name) is None}
        assert set(r.measured.reasons) == missing, r.record_id


def test_no_pr_in_atrial_fibrillation_or_flutter(results):
    no_p = [r for r in results if not r.labels.has_pr]
    assert len(no_p) >= 8
    refused = [r for r in no_p if r.measured.pr_ms is None]
    assert len(refused) >= 0.8 * len(no_p), [r.record_id for r in no_p if r not in refused]


def test_paced_records_and_only_they_are_called_paced(results):
    for r in results:
        paced = "paced" in r.measured.reasons.get("qrs_ms", "")
        assert paced == bool(r.labels.pacing), r.record_id


# --- out of fold: each record scored by a Conf tuned without it (bench/folds.py) ----------

def _load_folds() -> Any:
    return load_bench("folds")


@pytest.fixture(scope="module")
def folds():
    return _load_folds()


@pytest.fixture(scope="module")
def fold_run(folds, results):
    """The five-fold run, its default-Conf passes taken from `results` (the same runs)."""
    cases = folds.load_cases(LUDB)
    measure = folds.Measurer(cases, known={r.record_id: r.measured for r in results})
    run = folds.run_folds(cases, measure)
    return cases, measure, run


@pytest.mark.parametrize("name", ["pr_ms", "qrs_ms", "qt_ms"])
def test_out_of_fold_intervals_meet_the_aim_or_keep_the_stated_figure(folds, fold_run, name):
    _, _, run = fold_run
    stats = folds.interval_figures(run.results, name)
    limit_mean, limit_sd = folds.LIMITS[name]
    aim_mean, aim_sd = folds.AIMS[name]
    assert limit_mean <= aim_mean  # every mean aim is met, and asserted as the aim
    assert stats["coverage"] >= folds.MIN_COVERAGE, stats
    assert abs(stats["mean"]) <= limit_mean, stats
    assert stats["sd"] <= limit_sd, stats
    if limit_sd > aim_sd:  # the gap the README states: the tail of a few records, not spread
        assert stats["sd_trimmed"] <= aim_sd, stats


def test_out_of_fold_heart_rate_within_3_bpm_on_97_percent(bench, folds, fold_run):
    _, _, run = fold_run
    hr = bench.heart_rate_stats(run.results)
    assert hr["n"] == 100 and hr["within"] >= folds.HR_AIM * hr["n"], hr


def test_out_of_fold_axis_category_keeps_the_stated_figures(bench, folds, fold_run):
    _, _, run = fold_run
    convention = bench.axis_stats(run.results, ludb.TEXTBOOK_AXIS_CATEGORIES)
    assert [upper for _, upper in ludb.TEXTBOOK_AXIS_CATEGORIES][:4] == [0.0, 30.0, 70.0, 90.0]
    assert convention["agreement"] >= folds.AXIS_LIMITS["convention"], convention
    assert run.axis_labelled == 96
    assert run.axis_hits_fitted / run.axis_labelled >= folds.AXIS_LIMITS["fitted"]
    # the aim (80 %) is not met; the ceiling test above says why no cut-off rule can


def test_no_record_is_scored_by_a_conf_tuned_on_it(folds, fold_run):
    cases, measure, run = fold_run
    ids = [c.record_id for c in cases]
    for k, conf in enumerate(run.confs):
        held_out = {rid for i, rid in enumerate(ids) if folds.fold_of(i) == k}
        assert len(held_out) == 20
        used_on = {rid for (c, rid) in measure.cache if c == conf}
        assert used_on == held_out, k  # the fold's own Conf measured its fold and only it
    scored = [r.measured for r in run.results]
    by_fold = {rid: run.confs[folds.fold_of(i)] for i, rid in enumerate(ids)}
    for r, m in zip(run.results, scored, strict=True):
        assert measure.cache[(by_fold[r.record_id], r.record_id)] is m


def test_tuning_sees_only_its_training_records(folds, fold_run):
    cases, measure, _ = fold_run
    train = cases[:80]
    asked: set[int] = set()

    class Spy:
        def __call__(self, conf, ids):
            asked.update(ids)
            return measure(conf, ids)

    conf = folds.tune(train, Spy())
    assert asked == {c.record_id for c in train}
    assert isinstance(conf, folds.Conf)


@pytest.mark.slow
def test_no_threshold_beyond_the_grid_closes_the_qrs_or_qt_gap(folds, fold_run):
    """README: QRS SDs 10.2-10.7 (11.0 at 40 Hz), QT 25.3-26.3 for the T variants."""
    cases, measure, _ = fold_run
    for changes, sds in folds.sensitivity(cases, measure):
        assert sds["qrs_ms"] > folds.AIMS["qrs_ms"][1], (changes, sds)
        if any(k.startswith("t_") for k in changes):
            assert sds["qt_ms"] > 25.0, (changes, sds)


def test_readme_table_is_the_out_of_fold_run(folds, fold_run, results):
    _, measure, run = fold_run
    inside = folds.in_sample(fold_run[0], measure)
    readme = (REPO / "README.md").read_text()
    for line in folds.table_lines(run, inside):
        assert line in readme, f"README.md lacks (run bench/folds.py): {line}"


# --- the reader and the reference, on hand-made input -------------------------------------

def _word(code: int, delta: int) -> bytes:
    return struct.pack("<H", (code << 10) | delta)


def test_annotation_reader_handles_skip_aux_and_num(tmp_path):
    data = (
        _word(39, 100)                      # ( at 100
        + _word(ludb.NUM, 3)                # field change: no annotation, no time
        + _word(1, 12)                      # N at 112
        + _word(ludb.AUX, 3) + b"abc\x00"   # 3 text bytes, padded to 4
        + _word(40, 20)                     # ) at 132
        + _word(ludb.SKIP, 0) + struct.pack("<HH", 0x0001, 0x0004)  # +65540, high word first
        + _word(24, 6)                      # p at 132 + 65540 + 6
        + _word(0, 0)                       # end
        + _word(27, 5)                      # after the end: ignored
    )
    path = tmp_path / "x.ii"
    path.write_bytes(data)
    ann = ludb.read_annotations(path)
    assert ann.symbols == ("(", "N", ")", "p")
    assert ann.samples.tolist() == [100, 112, 132, 132 + 65540 + 6]
    assert ludb.waves(ann) == [ludb.Wave("N", 100, 112, 132), ludb.Wave("p", None, 65678, None)]


def test_real_annotation_files_hold_only_wave_triplets():
    for rid in ludb.record_ids(LUDB)[:10]:
        for lead, ws in ludb.lead_waves(LUDB, rid).items():
            assert ws, (rid, lead)
            assert {w.kind for w in ws} <= {"p", "N", "t"}
            for w in ws:
                assert w.onset is None or w.onset < w.peak
                assert w.offset is None or w.peak < w.offset


def test_reference_is_earliest_onset_and_latest_offset_over_leads():
    W = ludb.Wave
    by_lead = {
        "II": [W("p", 100, 130, 160), W("N", 200, 230, 260), W("t", 300, 380, 450),
               W("N", 600, 630, 660)],
        "V1": [W("p", 95, 128, 150), W("N", 196, 228, 270), W("t", 310, 390, 470)],
        "V2": [W("p", 90, 185, 195), W("N", 205, 232, 262), W("t", 320, 560, 590)],
    }
    beats = ludb.reference_beats(by_lead, fs=500.0)
    assert [b.qrs_peak for b in beats] == [230, 630]
    first = beats[0]
    assert first.qrs_onset == 196 and first.qrs_offset == 270
    assert first.p_onset == 95  # V2's "P" peaks 55 samples (110 ms) from lead II's: left out
    assert first.t_offset == 470  # V2's "T" peaks 180 samples (360 ms) away: left out
    assert beats[1].p_onset is None and beats[1].t_offset is None


def test_labels_read_multiline_cells():
    labels = ludb.read_labels(LUDB / "ludb.csv")
    assert len(labels) == 100
    assert labels[1].axis == "left axis deviation" and labels[1].has_pr
    assert not labels[109].has_pr and "aberrant" in labels[109].rhythm
    assert labels[45].pacing and not labels[1].pacing
    assert {lab.axis for lab in labels.values()} <= {None, *(n for n, _ in ludb.AXIS_CATEGORIES)}


def test_the_measure_command_gives_these_numbers_a_line_per_input(results, capsys):
    """`device-agent measure --json` over the LUDB records: the accuracy above is the
    command's, value for value, one JSON object a line, in input order."""
    import json

    from device_agent.commands import main

    paths = [LUDB / f"{r.record_id}.hea" for r in results]
    assert main(["measure", "--json", *map(str, paths)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input"] for line in lines] == [str(p) for p in paths]
    for line, r in zip(lines, results, strict=True):
        for name in MEASUREMENT_NAMES:
            expected = r.measured.value(name)
            if expected is None:
                assert line[name] is None and name in line["reasons"], (r.record_id, name)
            else:
                assert line[name] == pytest.approx(expected, abs=0.051), (r.record_id, name)


def test_measure_names_an_unreadable_input_and_exits_1(results, tmp_path, capsys):
    import json

    from device_agent.commands import main

    bad = tmp_path / "ecg_data_bad.json"
    bad.write_text("{not json")
    good = LUDB / f"{results[0].record_id}.hea"
    assert main(["measure", "--json", str(good), str(bad), str(good)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input"] for line in lines] == [str(good), str(bad), str(good)]
    assert "error" in lines[1] and "ecg_data_bad.json" in lines[1]["error"]
    assert lines[0]["heart_rate_bpm"] == lines[2]["heart_rate_bpm"] is not None
