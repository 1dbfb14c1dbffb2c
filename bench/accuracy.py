"""Measurement accuracy against LUDB's cardiologists: `measure_record` on every LUDB record.

Run as `.venv/bin/python bench/accuracy.py`; `evaluate()` returns the per-record results and
`accuracy_rows()` the table's rows, so tests/functional/test_measure_accuracy.py asserts on
the same numbers this prints.

Reference (tests/data/ludb/README.md, device_agent/lab/ludb.py): per beat marked in lead II
the earliest onset and latest offset over the 12 independently marked leads; the record's
PR, QRS and QT are the medians over its beats (no PR in atrial fibrillation or flutter).
Per record: difference = measured - reference (ms); the table gives their mean and SD over
the records where both exist, and coverage = records measured / records with a reference.
Heart rate: against 60 / mean RR of the QRS peaks marked in lead II. The first and last
beats are often unmarked, so in an irregular rhythm the marked span's rate differs from the
whole record's; the table also gives the error on records whose marked RR intervals are
regular (coefficient of variation under 0.1). QRS axis: `ludb.axis_category` of the
measured angle against the csv's label, with the fitted cut-offs of ludb.AXIS_CATEGORIES;
beside it the best any cut could do, the textbook cut-offs, cut-offs fitted on one half and
scored on the other (what fitting is worth on unseen records), and which labels are taken
for which.

Calibration: delineate.CALIBRATION_MS and the thresholds in delineate.py and
measurements.py were tuned on these (odd-numbered) records only; the even-numbered half
of LUDB is kept out of the repository to judge them.

Runtime: CPU time of measure_record per record (median over records, interleaved with the
baseline: qrs.detect_record on the same record, the detector alone), as a ratio.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import machine  # noqa: E402

from device_agent.clinical import qrs  # noqa: E402
from device_agent.clinical.measurements import Measurements, measure_record  # noqa: E402
from device_agent.lab import ludb  # noqa: E402

LUDB = REPO / "tests" / "data" / "ludb"
INTERVALS = (("PR", "pr_ms"), ("QRS", "qrs_ms"), ("QT", "qt_ms"))
# Aims (mean |difference| ms, SD ms, coverage) asserted by the functional test.
AIMS = {"pr_ms": (10.0, 14.0), "qrs_ms": (10.0, 15.0), "qt_ms": (15.0, 25.0)}
MIN_COVERAGE = 0.90
HR_TOLERANCE_BPM = 3.0
REGULAR_RR_CV = 0.10
# Ecgdeli 1.0.0 on all 200 LUDB records (tests/data/ludb/README.md), for scale.
ECGDELI = {"pr_ms": (1.4, 12.4), "qrs_ms": (-1.0, 15.7), "qt_ms": (-19.8, 30.0)}


@dataclass(frozen=True)
class RecordResult:
    """One LUDB record: what measure_record gave, the reference, and the labels."""

    record_id: int
    measured: Measurements
    reference: ludb.Reference
    labels: ludb.LudbLabels
    reference_rr_cv: float | None
    cpu_s: float
    baseline_cpu_s: float


def evaluate(directory: Path = LUDB) -> list[RecordResult]:
    """measure_record on every LUDB record in `directory`, with its reference."""
    labels = ludb.read_labels(directory / "ludb.csv")
    results = []
    for rid in ludb.record_ids(directory):
        record = ludb.load_record(directory, rid)
        t0 = time.process_time()
        measured = measure_record(record)
        t1 = time.process_time()
        qrs.detect_record(record)
        t2 = time.process_time()
        beats = ludb.reference_beats(ludb.lead_waves(directory, rid))
        rr = np.diff([b.qrs_peak for b in beats]).astype(np.float64)
        cv = float(rr.std() / rr.mean()) if rr.size >= 2 else None
        results.append(RecordResult(rid, measured, ludb.reference(directory, rid, labels[rid]),
                                    labels[rid], cv, t1 - t0, t2 - t1))
    return results


def interval_stats(results: list[RecordResult], name: str) -> dict:
    """Mean and SD of measured - reference (ms), n compared, coverage, for one interval."""
    with_ref = [r for r in results if getattr(r.reference, name) is not None]
    diffs = np.array([float(r.measured.value(name) or 0.0) - float(getattr(r.reference, name))
                      for r in with_ref if r.measured.value(name) is not None], dtype=np.float64)
    return {
        "mean": float(diffs.mean()) if diffs.size else None,
        "sd": float(diffs.std()) if diffs.size else None,
        "n": int(diffs.size),
        "with_reference": len(with_ref),
        "coverage": diffs.size / len(with_ref) if with_ref else None,
    }


def heart_rate_stats(results: list[RecordResult], *, regular_only: bool = False) -> dict:
    """Mean and max |measured - reference| bpm, over records with both (optionally regular)."""
    rows = [r for r in results if r.reference.heart_rate_bpm is not None
            and (not regular_only or (r.reference_rr_cv is not None
                                      and r.reference_rr_cv < REGULAR_RR_CV))]
    diffs = np.array([abs(float(r.measured.heart_rate_bpm or 0.0)
                          - float(r.reference.heart_rate_bpm or 0.0))
                      for r in rows if r.measured.heart_rate_bpm is not None])
    return {
        "mean_abs": float(diffs.mean()) if diffs.size else None,
        "max_abs": float(diffs.max()) if diffs.size else None,
        "within": int((diffs <= HR_TOLERANCE_BPM).sum()),
        "n": int(diffs.size),
        "with_reference": len(rows),
    }


def axis_stats(results: list[RecordResult],
               categories: ludb.AxisCategories = ludb.AXIS_CATEGORIES) -> dict:
    """Share of labelled records whose measured QRS axis falls in the labelled category."""
    labelled = [r for r in results if r.labels.axis]
    hits = sum(1 for r in labelled if r.measured.qrs_axis_deg is not None
               and ludb.axis_category(r.measured.qrs_axis_deg, categories) == r.labels.axis)
    measured = sum(1 for r in labelled if r.measured.qrs_axis_deg is not None)
    return {"agreement": hits / len(labelled) if labelled else None, "hits": hits,
            "measured": measured, "labelled": len(labelled)}


def axis_confusions(results: list[RecordResult],
                    categories: ludb.AxisCategories = ludb.AXIS_CATEGORIES,
                    ) -> list[tuple[str, str, int]]:
    """(labelled, measured category, records) for each disagreement, most frequent first."""
    count: dict[tuple[str, str], int] = {}
    for r in results:
        if r.labels.axis and r.measured.qrs_axis_deg is not None:
            got = ludb.axis_category(r.measured.qrs_axis_deg, categories)
            if got != r.labels.axis:
                count[r.labels.axis, got] = count.get((r.labels.axis, got), 0) + 1
    return sorted(((a, b, n) for (a, b), n in count.items()), key=lambda t: (-t[2], t[0], t[1]))


def fit_axis_cuts(pairs: list[tuple[float, str]]) -> tuple[ludb.AxisCategories, int]:
    """The cut-offs that put most (angle, label) pairs in their label, and how many they do.

    Categories keep ludb.AXIS_CATEGORIES' order; each cut lies halfway between two distinct
    measured angles (or past the ends), so equal angles always share a category.
    """
    order = [name for name, _ in ludb.AXIS_CATEGORIES]
    ranked = sorted(pairs)
    angles = [a for a, _ in ranked]
    n, k = len(ranked), len(order)
    # seen[c][j]: pairs labelled c among the first j
    seen = np.zeros((k, n + 1), dtype=np.int64)
    for j, (_, label) in enumerate(ranked):
        seen[:, j + 1] = seen[:, j] + (np.arange(k) == order.index(label))
    allowed = [j for j in range(n + 1) if j in (0, n) or angles[j - 1] < angles[j]]
    # best[j]: most agreements with categories 0..c covering the first j pairs; via[c][j]: where
    # category c starts in that best split
    best = {j: int(seen[0, j]) for j in allowed}
    via: list[dict[int, int]] = []
    for c in range(1, k):
        step: dict[int, int] = {}
        nxt: dict[int, int] = {}
        for j in allowed:
            i = max((i for i in allowed if i <= j), key=lambda i: best[i] + seen[c, j] - seen[c, i])
            nxt[j], step[j] = int(best[i] + seen[c, j] - seen[c, i]), i
        best = nxt
        via.append(step)
    bounds = [n]
    for step in reversed(via):
        bounds.append(step[bounds[-1]])
    bounds.reverse()  # bounds[c]: pairs in categories 0..c (the last entry: all n)

    def cut(j: int) -> float:
        if j <= 0:
            return -math.inf
        if j >= n:
            return math.inf
        return (angles[j - 1] + angles[j]) / 2.0

    cuts = tuple((order[c], cut(bounds[c])) for c in range(k - 1))
    return (*cuts, (order[-1], math.inf)), best[n]


def _axis_pairs(results: list[RecordResult]) -> list[tuple[float, str]]:
    return [(float(r.measured.qrs_axis_deg), r.labels.axis) for r in results
            if r.labels.axis and r.measured.qrs_axis_deg is not None]


def axis_ceiling(results: list[RecordResult]) -> float | None:
    """The best agreement any rule cutting the measured QRS angle into the five labels, in
    their order, could reach: the labels overlap in angle, so this caps axis_stats."""
    pairs = _axis_pairs(results)
    return fit_axis_cuts(pairs)[1] / len(pairs) if pairs else None


def axis_cross_validated(results: list[RecordResult]) -> list[dict]:
    """Cut-offs fitted on alternate records (1st, 3rd, ... or 2nd, 4th, ...) and scored on
    the rest: what fitted cut-offs are worth on records they were not fitted to."""
    ordered = sorted(results, key=lambda r: r.record_id)
    halves = (ordered[0::2], ordered[1::2])
    rows = []
    for fit_on, score_on in (halves, halves[::-1]):
        cuts, _ = fit_axis_cuts(_axis_pairs(fit_on))
        s = axis_stats(score_on, cuts)
        rows.append({"cuts": cuts, "agreement": s["agreement"], "hits": s["hits"],
                     "labelled": s["labelled"]})
    return rows


def axis_random_halves(results: list[RecordResult], splits: int = 200, seed: int = 0) -> dict:
    """Held-out agreement of fitted cut-offs over many random halvings (seeded): the mean
    and SD say more than the one alternate split of axis_cross_validated."""
    pairs = _axis_pairs(results)
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(splits):
        order = rng.permutation(len(pairs))
        fit_on, score_on = order[: len(pairs) // 2], order[len(pairs) // 2 :]
        cuts, _ = fit_axis_cuts([pairs[i] for i in fit_on])
        scores.append(np.mean([ludb.axis_category(pairs[i][0], cuts) == pairs[i][1]
                               for i in score_on]))
    return {"mean": float(np.mean(scores)), "sd": float(np.std(scores)), "splits": splits}


def runtime_stats(results: list[RecordResult]) -> dict:
    """Median CPU seconds per record of measure_record and of the QRS detector alone."""
    ours = statistics.median(r.cpu_s for r in results)
    base = statistics.median(r.baseline_cpu_s for r in results)
    return {"measure_s": ours, "detector_s": base, "ratio": ours / base if base else None}


def accuracy_rows(results: list[RecordResult]) -> list[dict]:
    """The table: one row per quantity, with its aim."""
    rows = []
    for label, name in INTERVALS:
        s = interval_stats(results, name)
        aim_mean, aim_sd = AIMS[name]
        e_mean, e_sd = ECGDELI[name]
        rows.append({
            "quantity": f"{label} (ms)",
            "result": f"{s['mean']:+.1f} +/- {s['sd']:.1f}" if s["n"] else "-",
            "coverage": f"{s['n']}/{s['with_reference']} ({s['coverage']:.0%})"
            if s["with_reference"] else "-",
            "aim": f"abs(mean) <= {aim_mean:g}, SD <= {aim_sd:g}, >= {MIN_COVERAGE:.0%}",
            "ecgdeli": f"{e_mean:+.1f} +/- {e_sd:.1f}",
        })
    for regular in (False, True):
        h = heart_rate_stats(results, regular_only=regular)
        rows.append({
            "quantity": "heart rate (bpm)" + (", regular RR" if regular else ""),
            "result": f"mean abs diff {h['mean_abs']:.2f}, max {h['max_abs']:.1f}",
            "coverage": f"{h['n']}/{h['with_reference']}, {h['within']} within "
                        f"{HR_TOLERANCE_BPM:g}",
            "aim": f"within {HR_TOLERANCE_BPM:g}",
            "ecgdeli": "-",
        })
    a = axis_stats(results)
    cap = axis_ceiling(results)
    book = axis_stats(results, ludb.TEXTBOOK_AXIS_CATEGORIES)
    cv = axis_cross_validated(results)
    halves = axis_random_halves(results)
    rows.append({
        "quantity": "QRS axis category",
        "result": f"{a['agreement']:.0%} agree (fitted cut-offs; any angle rule: at most "
                  f"{cap:.0%}; textbook cut-offs: {book['agreement']:.0%}; cut-offs fitted "
                  f"on alternate records, on the others: {cv[0]['agreement']:.0%}, "
                  f"{cv[1]['agreement']:.0%}; on random halves: {halves['mean']:.0%} +/- "
                  f"{halves['sd']:.0%})",
        "coverage": f"{a['measured']}/{a['labelled']} measured, {a['hits']} agree",
        "aim": ">= 85%",
        "ecgdeli": "-",
    })
    return rows


def main() -> int:
    results = evaluate()
    columns = ("quantity", "result", "coverage", "aim", "ecgdeli")
    print(f"LUDB odd-numbered records ({len(results)}), measure_record vs cardiologists")
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in accuracy_rows(results):
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print()
    confusions = ", ".join(f"{label} as {got} {n}" for label, got, n in axis_confusions(results))
    print(f"QRS axis disagreements (label as measured category, records): {confusions}")
    rt = runtime_stats(results)
    print()
    print(f"measure_record: median {rt['measure_s'] * 1000:.1f} ms CPU per 10 s record, "
          f"{rt['ratio']:.1f}x the QRS detector alone ({rt['detector_s'] * 1000:.1f} ms); "
          f"{machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
