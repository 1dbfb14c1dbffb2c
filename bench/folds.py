"""Out-of-fold accuracy on the shipped LUDB records: tune on four folds, score the fifth.

Run as `.venv/bin/python bench/folds.py [--sensitivity]`;
tests/functional/test_measure_accuracy.py loads this file and asserts on the same numbers
(`run_folds`, `fold_rows`, `sensitivity`).

Why: the delineator's thresholds and calibration (delineate.Conf) were tuned on the same
100 records bench/accuracy.py scores it on, so that table is in-sample. Here each record
is measured by a Conf that never saw it.

Folds: the records sorted by number, record i (0-based) in fold i % FOLDS (5 folds of 20).
Tuning, on the four training folds only:
1. Thresholds: a small grid (GRID), one field at a time, the others at their defaults;
   each field is judged by the SD of its interval's error (measured - cardiologists) over
   the training records, among values that keep MIN_COVERAGE of them measured: qrs_edge by
   QRS, p_edge by PR, t_edge by QT. The chosen values together make the fold's Conf.
2. Calibration: with those thresholds, the training records' mean errors are taken out of
   the boundary shifts (P onset by the PR error, QRS offset by the QRS error, T end by the
   QT error; QRS onset, shared by all three, stays).
3. QRS axis category: cut-offs fitted to the training records' angles and labels
   (accuracy.fit_axis_cuts); beside it the LUDB convention's textbook cut-offs, which need
   no fitting (ludb.TEXTBOOK_AXIS_CATEGORIES).
The held-out fold is then measured with its fold's Conf and scored; the out-of-fold figures
are over all 100 records, each scored once, by a Conf tuned without it. Heart rate uses no
Conf field: its figure is the same in and out of fold.

The measure_record runs under each grid Conf are shared by the folds (one pass over the
records per Conf: GRID has 7), then each fold's own Conf measures its own records: about
10 passes in all (measure_record is ~25 ms a record).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_agent.clinical.delineate import DEFAULT_CONF, Conf  # noqa: E402
from device_agent.clinical.measurements import Measurements, measure_record  # noqa: E402
from device_agent.lab import ludb  # noqa: E402

LUDB = REPO / "tests" / "data" / "ludb"
FOLDS = 5
GRID = {"qrs_edge": (0.005, 0.01, 0.02), "p_edge": (0.15, 0.20, 0.25),
        "t_edge": (0.05, 0.10, 0.15)}
JUDGED_BY = {"qrs_edge": "qrs_ms", "p_edge": "pr_ms", "t_edge": "qt_ms"}
MIN_COVERAGE = 0.90
# The aims, on records not used for tuning (mean difference ms, SD ms).
AIMS = {"pr_ms": (5.0, 10.0), "qrs_ms": (5.0, 10.0), "qt_ms": (5.0, 20.0)}
HR_AIM = 0.97  # of the records within 3 bpm
AXIS_AIM = 0.80
# What tests/functional/test_measure_accuracy.py asserts out of fold: the aim where it is
# met; where it is not, the figure reached (README: QRS SD 10.8, QT SD 25.0, axis 66 % with
# the convention's cut-offs and 74 % with fitted ones) with a margin, so a regression fails.
LIMITS = {"pr_ms": (5.0, 10.0), "qrs_ms": (5.0, 11.5), "qt_ms": (5.0, 26.5)}
AXIS_LIMITS = {"convention": 0.62, "fitted": 0.70}
INTERVALS = (("PR", "pr_ms"), ("QRS", "qrs_ms"), ("QT", "qt_ms"))


def _accuracy() -> ModuleType:
    """bench/accuracy.py (its stats functions and RecordResult), loaded by path."""
    name = "bench_accuracy"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Case:
    """One LUDB record with its reference and labels."""

    record_id: int
    record: object
    reference: ludb.Reference
    labels: ludb.LudbLabels
    reference_rr_cv: float | None


@dataclass(frozen=True)
class FoldRun:
    """The out-of-fold result: per fold its Conf and axis cut-offs; per record its scores."""

    confs: tuple[Conf, ...]
    results: list  # accuracy.RecordResult, measured by the Conf of the record's own fold
    axis_hits_fitted: int  # held-out records whose category matches with their fold's cuts
    axis_labelled: int


def load_cases(directory: Path = LUDB) -> list[Case]:
    labels = ludb.read_labels(directory / "ludb.csv")
    cases = []
    for rid in ludb.record_ids(directory):
        beats = ludb.reference_beats(ludb.lead_waves(directory, rid))
        rr = np.diff([b.qrs_peak for b in beats]).astype(np.float64)
        cv = float(rr.std() / rr.mean()) if rr.size >= 2 else None
        cases.append(Case(rid, ludb.load_record(directory, rid),
                          ludb.reference(directory, rid, labels[rid]), labels[rid], cv))
    return cases


def fold_of(index: int) -> int:
    return index % FOLDS


def _results(cases: list[Case], measured: dict[int, Measurements]) -> list:
    acc = _accuracy()
    return [acc.RecordResult(c.record_id, measured[c.record_id], c.reference, c.labels,
                             c.reference_rr_cv, 0.0, 0.0) for c in cases]


class Measurer:
    """measure_record per (Conf, record), each computed once."""

    def __init__(self, cases: list[Case],
                 known: dict[int, Measurements] | None = None) -> None:
        """`known`: measurements already made with DEFAULT_CONF (bench/accuracy.py's)."""
        self.cases = {c.record_id: c for c in cases}
        self.cache: dict[tuple[Conf, int], Measurements] = {
            (DEFAULT_CONF, rid): m for rid, m in (known or {}).items()}
        self.runs = 0

    def __call__(self, conf: Conf, ids: list[int]) -> dict[int, Measurements]:
        out = {}
        for rid in ids:
            key = (conf, rid)
            if key not in self.cache:
                self.cache[key] = measure_record(self.cases[rid].record, conf=conf)  # type: ignore[arg-type]
                self.runs += 1
            out[rid] = self.cache[key]
        return out


def _errors(cases: list[Case], measured: dict[int, Measurements], name: str) -> np.ndarray:
    diffs = [float(measured[c.record_id].value(name) or 0.0) - float(getattr(c.reference, name))
             for c in cases if getattr(c.reference, name) is not None
             and measured[c.record_id].value(name) is not None]
    return np.array(diffs, dtype=np.float64)


def _coverage(cases: list[Case], measured: dict[int, Measurements], name: str) -> float:
    with_ref = [c for c in cases if getattr(c.reference, name) is not None]
    got = [c for c in with_ref if measured[c.record_id].value(name) is not None]
    return len(got) / len(with_ref) if with_ref else 1.0


def tune(train: list[Case], measure: Measurer) -> Conf:
    """The Conf tuned on `train` only: GRID field by field, then the calibration."""
    ids = [c.record_id for c in train]
    chosen: dict[str, float] = {}
    for field, values in GRID.items():
        name = JUDGED_BY[field]
        best: tuple[float, float] | None = None
        for value in values:
            measured = measure(DEFAULT_CONF.replace(**{field: value}), ids)
            if _coverage(train, measured, name) < MIN_COVERAGE:
                continue
            sd = float(_errors(train, measured, name).std())
            if best is None or sd < best[0] - 1e-9:
                best = (sd, value)
        chosen[field] = best[1] if best else getattr(DEFAULT_CONF, field)
    thresholds = DEFAULT_CONF.replace(**chosen)
    measured = measure(thresholds, ids)
    mean = {name: float(_errors(train, measured, name).mean()) for _, name in INTERVALS}
    return thresholds.replace(
        p_onset_ms=round(thresholds.p_onset_ms + mean["pr_ms"], 1),
        qrs_offset_ms=round(thresholds.qrs_offset_ms - mean["qrs_ms"], 1),
        t_offset_ms=round(thresholds.t_offset_ms - mean["qt_ms"], 1),
    )


def run_folds(cases: list[Case] | None = None, measure: Measurer | None = None) -> FoldRun:
    """Tune on four folds, measure and score the fifth, for each fold."""
    acc = _accuracy()
    cases = load_cases() if cases is None else cases
    measure = Measurer(cases) if measure is None else measure
    confs: list[Conf] = []
    held_out: dict[int, Measurements] = {}
    hits = labelled = 0
    for k in range(FOLDS):
        train = [c for i, c in enumerate(cases) if fold_of(i) != k]
        test = [c for i, c in enumerate(cases) if fold_of(i) == k]
        conf = tune(train, measure)
        confs.append(conf)
        held_out.update(measure(conf, [c.record_id for c in test]))
        trained = measure(DEFAULT_CONF, [c.record_id for c in train])
        pairs = [(float(trained[c.record_id].qrs_axis_deg), c.labels.axis) for c in train
                 if c.labels.axis and trained[c.record_id].qrs_axis_deg is not None]
        cuts, _ = acc.fit_axis_cuts(pairs)
        for c in test:
            if not c.labels.axis:
                continue
            labelled += 1
            angle = held_out[c.record_id].qrs_axis_deg
            hits += angle is not None and ludb.axis_category(angle, cuts) == c.labels.axis
    return FoldRun(tuple(confs), _results(cases, held_out), hits, labelled)


def in_sample(cases: list[Case], measure: Measurer | None = None) -> list:
    """The default Conf (tuned on all these records) on every record: the in-sample table."""
    measure = Measurer(cases) if measure is None else measure
    return _results(cases, measure(DEFAULT_CONF, [c.record_id for c in cases]))


def interval_figures(results: list, name: str) -> dict:
    """Mean, SD and coverage of one interval's errors, plus what drives the SD: the SD
    without the worst 5 % of records, the median absolute error, and the worst records."""
    acc = _accuracy()
    stats = acc.interval_stats(results, name)
    rows = sorted(((float(r.measured.value(name)) - float(getattr(r.reference, name)),
                    r.record_id) for r in results
                   if r.measured.value(name) is not None
                   and getattr(r.reference, name) is not None), key=lambda t: -abs(t[0]))
    d = np.array([e for e, _ in rows])
    trimmed = d[max(1, round(0.05 * d.size)):] if d.size else d
    stats.update(sd_trimmed=float(trimmed.std()) if trimmed.size else None,
                 median_abs=float(np.median(np.abs(d))) if d.size else None,
                 worst=[(rid, round(e)) for e, rid in rows[:5]])
    return stats


def fold_rows(run: FoldRun, inside: list) -> list[dict]:
    """The README's table: in-sample and out-of-fold, side by side, with the aims."""
    acc = _accuracy()
    rows = []
    for label, name in INTERVALS:
        a, b = interval_figures(inside, name), interval_figures(run.results, name)
        aim_mean, aim_sd = AIMS[name]
        met = abs(b["mean"]) <= aim_mean and b["sd"] <= aim_sd
        rows.append({"quantity": f"{label} (ms)",
                     "in_sample": f"{a['mean']:+.1f} +/- {a['sd']:.1f} ({a['n']}/"
                                  f"{a['with_reference']})",
                     "out_of_fold": f"{b['mean']:+.1f} +/- {b['sd']:.1f} ({b['n']}/"
                                    f"{b['with_reference']})",
                     "aim": f"mean within {aim_mean:g}, SD <= {aim_sd:g}",
                     "met": "yes" if met else "no"})
    for which, results in (("in_sample", inside), ("out_of_fold", run.results)):
        h = acc.heart_rate_stats(results)
        rows_hr = f"{h['within']}/{h['n']} within 3 bpm ({h['within'] / h['n']:.0%})"
        if which == "in_sample":
            hr = {"quantity": "heart rate", "in_sample": rows_hr}
        else:
            hr["out_of_fold"] = rows_hr
            hr["aim"] = f"{HR_AIM:.0%} within 3 bpm"
            hr["met"] = "yes" if h["within"] >= HR_AIM * h["n"] else "no"
    rows.append(hr)
    book_in = acc.axis_stats(inside, ludb.TEXTBOOK_AXIS_CATEGORIES)
    book_out = acc.axis_stats(run.results, ludb.TEXTBOOK_AXIS_CATEGORIES)
    rows.append({"quantity": "QRS axis category, LUDB convention cut-offs",
                 "in_sample": f"{book_in['hits']}/{book_in['labelled']} "
                              f"({book_in['agreement']:.0%})",
                 "out_of_fold": f"{book_out['hits']}/{book_out['labelled']} "
                                f"({book_out['agreement']:.0%})",
                 "aim": f"{AXIS_AIM:.0%}",
                 "met": "yes" if book_out["agreement"] >= AXIS_AIM else "no"})
    fitted_in = acc.axis_stats(inside)
    share = run.axis_hits_fitted / run.axis_labelled
    rows.append({"quantity": "QRS axis category, cut-offs fitted (on the training folds)",
                 "in_sample": f"{fitted_in['hits']}/{fitted_in['labelled']} "
                              f"({fitted_in['agreement']:.0%})",
                 "out_of_fold": f"{run.axis_hits_fitted}/{run.axis_labelled} ({share:.0%})",
                 "aim": f"{AXIS_AIM:.0%}", "met": "yes" if share >= AXIS_AIM else "no"})
    return rows


# In-sample sensitivity of the unmet SDs to thresholds beyond the grid (README, Limits of
# the table): `bench/folds.py --sensitivity`.
SENSITIVITY: tuple[dict[str, float], ...] = (
    {"qrs_edge": 0.003}, {"qrs_edge": 0.005}, {"qrs_edge": 0.02}, {"qrs_core": 0.2},
    {"qrs_core": 0.4}, {"low_pass_hz": 40.0}, {"t_smooth_s": 0.012}, {"t_smooth_s": 0.016},
    {"t_end_search_s": 0.4},
)


def sensitivity(cases: list[Case], measure: Measurer | None = None
                ) -> list[tuple[dict[str, float], dict[str, float]]]:
    """(changes, {interval: SD ms}) for each SENSITIVITY variant, on every record."""
    measure = Measurer(cases) if measure is None else measure
    ids = [c.record_id for c in cases]
    rows = []
    for changes in SENSITIVITY:
        got = measure(DEFAULT_CONF.replace(**changes), ids)
        rows.append((changes, {name: float(_errors(cases, got, name).std())
                               for _, name in INTERVALS}))
    return rows


COLUMNS = ("quantity", "in_sample", "out_of_fold", "aim", "met")
HEADINGS = ("quantity", "in-sample (mean +/- SD, measured / with a reference)",
            "out-of-fold (5 folds)", "aim (out of fold)", "met")


def table_lines(run: FoldRun, inside: list) -> list[str]:
    """The Markdown table the README carries, line by line."""
    lines = ["| " + " | ".join(HEADINGS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |"
              for row in fold_rows(run, inside)]
    return lines


def main() -> int:
    cases = load_cases()
    measure = Measurer(cases)
    if "--sensitivity" in sys.argv[1:]:
        for changes, sds in sensitivity(cases, measure):
            print(changes, ", ".join(f"{name} SD {sd:.1f}" for name, sd in sds.items()))
        return 0
    inside = in_sample(cases, measure)
    run = run_folds(cases, measure)
    print(f"LUDB shipped records ({len(cases)}), {FOLDS} folds (record i in fold i % "
          f"{FOLDS}); measure_record vs the cardiologists")
    print()
    print("\n".join(table_lines(run, inside)))
    print()
    for label, name in INTERVALS:
        f = interval_figures(run.results, name)
        print(f"{label} out of fold: median |error| {f['median_abs']:.1f} ms, SD without the "
              f"worst 5 % {f['sd_trimmed']:.1f} ms, worst (record, ms): {f['worst']}")
    print()
    for k, conf in enumerate(run.confs):
        changed = {f: getattr(conf, f) for f in (*GRID, "p_onset_ms", "qrs_offset_ms",
                                                  "t_offset_ms")
                   if getattr(conf, f) != getattr(DEFAULT_CONF, f)}
        print(f"fold {k}: {changed or 'defaults'}")
    print(f"measure_record runs: {measure.runs} (100 records, {len(GRID)} grid fields)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
