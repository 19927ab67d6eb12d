"""Tests of `anomalyd evaluate` (cli -> evaluation.command.add_arguments / .run) on small inputs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomalyd.cli import main
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.core.stored_run import run_stored
from anomalyd.demo.synthetic import ANOMALY_KINDS, ecg, inject
from anomalyd.evaluation.command import _detector_spec, add_arguments
from anomalyd.evaluation.datasets import load_labelled_csv
from anomalyd.evaluation.report import find_plot_events, format_table
from anomalyd.evaluation.series import EvalSeries, load_csv_series
from anomalyd.service import catalog
from anomalyd.service.catalog import StoredModel
from conftest import NAB, WHERE

PNG = b"\x89PNG\r\n\x1a\n"


def evaluate(*argv: str | Path | float) -> int:
    """``anomalyd evaluate ARGV...`` through the real command line (no config file is needed)."""
    return main(["evaluate", *(str(a) for a in argv)])


def run_isolated(argv: list[str], timeout: float = 60) -> None:
    """Run ``python ARGV`` in its own process group; fail (killing the group) when it does not finish in time."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and the pool workers it forked
        proc.communicate()
        pytest.fail(f"python {' '.join(argv)[:200]} did not finish in {timeout:g}s")
    assert proc.returncode == 0, err


def csv_series(*argv: str | Path | float) -> EvalSeries:
    """The series `anomalyd evaluate CSV ARGV...` scores (one row per CSV row, before thresholds and metrics)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(a) for a in argv])
    (series,) = load_csv_series(args, _detector_spec(args))
    return series


def csv_times(n: int) -> np.ndarray:
    """Epoch-ns times of the rows of the `labelled` CSV (one per second from 2024-01-01)."""
    return np.datetime64("2024-01-01T00:00:00", "ns").astype(np.int64) + np.arange(n, dtype=np.int64) * 10**9


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list]:
    """A 4,000-row synthetic ECG with one anomaly of each kind, written as timestamp,value,label.

    Each label covers the anomaly and the 40 rows after it (half a beat), like NAB's windows around an anomaly:
    a causal detector sees a change only once it is inside a window.
    """
    x, beats = ecg(4000, seed=5)
    y, found = inject(x, beats, ANOMALY_KINDS, start=1600, seed=2, spacing=400)
    labels = np.zeros(y.size, dtype=int)
    for a in found:
        labels[a.start : a.end + 40] = 1
    path = tmp_path_factory.mktemp("csv") / "ecg.csv"
    t0 = np.datetime64("2024-01-01T00:00:00")
    lines = ["timestamp,value,label"]
    lines += [f"{t0 + np.timedelta64(i, 's')},{v:.6f},{lab}" for i, (v, lab) in enumerate(zip(y, labels, strict=True))]
    path.write_text("\n".join(lines) + "\n")
    return path, y, found


def test_load_labelled_csv(labelled: tuple, tmp_path: Path) -> None:
    path, y, found = labelled
    stamps, values, labels = load_labelled_csv(path)
    assert len(stamps) == values.size == 4000 and labels is not None
    assert np.allclose(values, y, atol=1e-6)
    assert int(labels.sum()) == sum(a.end + 40 - a.start for a in found)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,value\n1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv: header must be 'timestamp,value'"):
        load_labelled_csv(bad)
    bad.write_text("timestamp,value,label\n1,2,7\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: label '7' must be 0 or 1"):
        load_labelled_csv(bad)
    unlabelled = tmp_path / "u.csv"
    unlabelled.write_text("timestamp,value\n1,2\n2,\n")
    _, v, lab = load_labelled_csv(unlabelled)
    assert lab is None and np.isnan(v[1])


def test_csv_writes_table_json_and_plots(labelled: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, found = labelled
    out_json, plots = tmp_path / "report.json", tmp_path / "plots"
    code = evaluate(path, "--train-rows", 1200, "--json", out_json, "--plots", plots, "--n-plots", 2,
                    "--no-progress")
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("series")
    assert "ecg.csv" in printed and "NAB normalised score" in printed
    report = json.loads(out_json.read_text())
    assert report["format"] == "csv" and report["detector"] == DetectorSpec().to_dict()  # the daemon's defaults
    (row,) = report["series"]
    # the operating threshold is the detector's decision: score >= 0.5, i.e. score > the float just below
    assert row["n_train"] == 1200 and row["threshold"] == np.nextafter(0.5, -np.inf)
    assert row["segments"] == len(found) and row["flagged"] == row["decisions"]
    # the injected anomalies are found, with hardly a flag outside the labels
    assert row["nab_detected"] >= len(found) - 1 and row["pa_precision"] > 0.9
    assert report["summary"]["nab"]["standard"]["score"] > 50
    pngs = sorted(plots.glob("*.png"))
    assert pngs, "no plot written"
    assert all(p.read_bytes()[:8] == PNG for p in pngs)
    assert [str(p) for p in pngs] == sorted(report["plots"])


def test_csv_is_the_stored_path_of_the_daemon(labelled: tuple) -> None:
    """A CSV is evaluated as `run_stored` runs it (train on the first rows, stream the rest through the daemon's
    detector), which for a gap-free series is the detector fitted on the training rows and fed the rest."""
    path, y, _ = labelled
    got = csv_series(path, "--train-rows", 1200)
    times = csv_times(y.size)
    values = load_labelled_csv(path)[1]
    run = run_stored(times, values, int(times[1199]), DetectorSpec(), max_gap=8)
    assert run.batch.complete.all()
    np.testing.assert_array_equal(got.scores[:1200], 0.0)  # the training rows are not scored
    np.testing.assert_array_equal(got.scores[1200:], run.batch.score)
    det = Detector(DetectorSpec()).fit([values[:1200]], [int(times[0] // 10**9)])
    batch = det.update(det.start(int(times[1200] // 10**9), values[:1200]), values[1200:])
    np.testing.assert_array_equal(got.scores[1200:], batch.score)
    np.testing.assert_array_equal(got.scores[1200:] > got.threshold, batch.anomalous)


def test_csv_at_the_daemons_slide(labelled: tuple, tmp_path: Path) -> None:
    path, _, _ = labelled
    out_json = tmp_path / "slide.json"
    assert evaluate(path, "--train-rows", 1200, "--slide", 4, "--json", out_json, "--no-progress") == 0
    report = json.loads(out_json.read_text())
    assert report["detector"]["stride"] == 4
    (row,) = report["series"]
    assert row["nab_detected"] >= 1  # still finds the obvious anomalies, on fewer rows
    # only every 4th row (grid index, here the epoch second, divisible by 4) is scored; the others score 0
    got = csv_series(path, "--train-rows", 1200, "--slide", 4)
    on_grid = csv_times(got.scores.size) // 10**9 % 4 == 0
    assert not got.scores[~on_grid].any()
    scored = got.scores[1200:][on_grid[1200:]]
    assert np.count_nonzero(scored) > 0.9 * scored.size
    assert evaluate(path, "--slide", 0, "--no-progress") == 1


def test_csv_gaps_are_filled_up_to_max_gap(labelled: tuple, tmp_path: Path) -> None:
    """Empty values are missing samples: a hole of 5 rows is interpolated with the default --max-gap 8, as
    signals.max_gap does; with --max-gap 2 the windows holding it are missing-data windows (score 0)."""
    path, _, _ = labelled
    lines = path.read_text().splitlines()
    hole = range(2000, 2005)
    for i in hole:
        stamp, _, label = lines[1 + i].split(",")
        lines[1 + i] = f"{stamp},,{label}"
    holed = tmp_path / "holed.csv"
    holed.write_text("\n".join(lines) + "\n")
    filled = csv_series(holed, "--train-rows", 1200)
    kept = csv_series(holed, "--train-rows", 1200, "--max-gap", 2)
    w = filled.info["window"]
    affected = slice(hole[0], hole[-1] + w)  # every window holding a missing row
    assert np.count_nonzero(filled.scores[affected]) > 0.9 * (affected.stop - affected.start)
    assert not kept.scores[affected].any()
    assert kept.scores[affected.stop :].any()  # scoring resumes after the hole
    assert evaluate(holed, "--max-gap", -1, "--no-progress") == 1


def test_csv_tuning_with_a_validation_split(labelled: tuple, tmp_path: Path) -> None:
    path, _, _ = labelled
    out_json = tmp_path / "r.json"
    assert evaluate(path, "--train-rows", 1200, "--tune", "window", "--window-size", 50, "--validation", 0.5,
                    "--json", out_json, "--no-progress") == 0
    (row,) = json.loads(out_json.read_text())["series"]
    assert row["threshold"] != np.nextafter(0.5, -np.inf) and "tuned_f1" in row and row["delta"] >= 0


def test_model_mode_tunes_and_writes_the_threshold_into_the_catalog(labelled: tuple, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path, y, _ = labelled
    # a stored detector unlike evaluate's defaults (fixed window 24, 20 shapes), so its use shows
    model = Detector(DetectorSpec(window=24, n_clusters=20, n_init=1)).fit([y[:1500]])
    stored = StoredModel(model_id="ecg", signal="ecg", tags=(), scope="shared", model=model, period_ns=10**9,
                         train_start_ns=0, train_end_ns=1500 * 10**9)
    meta = catalog.save(tmp_path / "models", stored)
    tuned_json = tmp_path / "tuned.json"
    assert evaluate(path, "--model", meta, "--tune", "point-adjusted", "--write-threshold", "--json", tuned_json,
                    "--no-progress") == 0
    assert "wrote threshold" in capsys.readouterr().out
    report = json.loads(tuned_json.read_text())
    assert report["detector"] == "stored model"
    (tuned,) = report["series"]
    assert tuned["model"] == "ecg" and tuned["window"] == 24 and tuned["n_clusters"] == 20
    assert tuned["n_train"] == 23 and tuned["pa_recall"] > 0  # the first window - 1 rows have no window
    after = catalog.load(meta)
    # the tuned level became the detector's decision (spec.score_threshold); the max_error level is untouched
    assert after.model.spec.score_threshold != model.spec.score_threshold
    assert after.model.spec.score_threshold == pytest.approx(tuned["threshold"])
    assert after.threshold == float(model.threshold_)
    assert after.meta["threshold_source"].startswith("anomalyd evaluate --tune point-adjusted")
    # the scores are the stored detector's over the CSV from its first row
    got = csv_series(path, "--model", meta)
    times = csv_times(y.size)
    run = run_stored(times, load_labelled_csv(path)[1], int(times[0]) - 1, period_ns=10**9, max_gap=8,
                     detector=after.model)
    np.testing.assert_array_equal(got.scores, np.nan_to_num(run.batch.score))
    # the written level means what was tuned: evaluating again with the model, its own decisions (what the
    # daemon writes as `anomalous`) flag exactly the rows the tuned threshold flagged
    again_json = tmp_path / "again.json"
    assert evaluate(path, "--model", meta, "--json", again_json, "--no-progress") == 0
    (again,) = json.loads(again_json.read_text())["series"]
    assert again["decisions"] == again["flagged"]
    assert again["flagged"] == tuned["flagged"], "the daemon flags a different set of rows than the tuned threshold"


def test_bad_option_combinations_exit_2_naming_the_fix(labelled: tuple, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = labelled
    unlabelled = tmp_path / "u.csv"
    unlabelled.write_text("\n".join(line.rsplit(",", 1)[0] for line in path.read_text().splitlines()) + "\n")
    assert evaluate(unlabelled, "--tune", "f1", "--no-progress") == 2
    assert "needs labels" in capsys.readouterr().err
    assert evaluate(unlabelled, "--no-progress", "--plots", tmp_path / "p") == 0  # alerts only, plotted as such
    assert all(p.name.startswith("alert-") for p in (tmp_path / "p").glob("*.png"))
    assert evaluate(path, "--tune", "f1", "--write-threshold", "--no-progress") == 2
    assert "--write-threshold needs --model" in capsys.readouterr().err
    assert evaluate(path, "--validation", 1.5) == 2
    assert evaluate(path.parent / "missing.csv") == 1
    assert "does not exist" in capsys.readouterr().err
    assert evaluate(path, "--window", "three") == 1
    assert "--window 'three'" in capsys.readouterr().err


def test_nab_layout_on_two_real_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (NAB / "data").is_dir():
        pytest.fail(f"NAB data not found at {NAB}; {WHERE}")
    names = ["realAdExchange/exchange-3_cpc_results.csv", "realTraffic/speed_7578.csv"]
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    for name in names:
        (tmp_path / "nab" / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(NAB / "data" / name, tmp_path / "nab" / "data" / name)
    (tmp_path / "nab" / "labels").mkdir()
    (tmp_path / "nab" / "labels" / "combined_windows.json").write_text(json.dumps({n: windows[n] for n in names}))
    out_json = tmp_path / "nab.json"
    assert evaluate(tmp_path / "nab", "--tune", "nab-standard", "--json", out_json, "--no-progress") == 0
    report = json.loads(out_json.read_text())
    assert report["format"] == "nab" and len(report["series"]) == 2
    assert report["summary"]["tuned"]["profile"] == "standard"
    assert report["summary"]["nab"]["standard"]["score"] == pytest.approx(report["summary"]["tuned"]["normalised"])
    assert all(r["nab_detected"] >= 1 for r in report["series"])
    # files evaluated in parallel (`anomalyd evaluate --jobs 2`, a fresh process) give the same report
    parallel_json = tmp_path / "parallel.json"
    run_isolated(["-m", "anomalyd.cli", "evaluate", str(tmp_path / "nab"), "--tune", "nab-standard", "--jobs", "2",
                  "--json", str(parallel_json), "--no-progress"])
    parallel = json.loads(parallel_json.read_text())
    assert parallel["summary"] == report["summary"] and parallel["series"] == report["series"]


def test_parallel_nab_after_kmeans_in_the_same_process(tmp_path: Path) -> None:
    """``anomalyd evaluate`` with ``--jobs 2`` from a process that already fitted a detector (scikit-learn's K-Means
    starts an OpenMP thread pool) must finish: a forked worker inherits a dead OpenMP pool and waits for ever."""
    if not (NAB / "data").is_dir():
        pytest.fail(f"NAB data not found at {NAB}; {WHERE}")
    name = "realAdExchange/exchange-3_cpc_results.csv"
    (tmp_path / "nab" / "data" / name).parent.mkdir(parents=True)
    shutil.copy(NAB / "data" / name, tmp_path / "nab" / "data" / name)
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    (tmp_path / "nab" / "labels").mkdir()
    (tmp_path / "nab" / "labels" / "combined_windows.json").write_text(json.dumps({name: windows[name]}))
    out_json = tmp_path / "nab.json"
    code = ("import numpy as np, sys\n"
            "from anomalyd.cli import main\n"
            "from anomalyd.core.detector import Detector\n"
            "Detector().fit([np.sin(np.arange(2000) / 5.0)])\n"
            f"sys.exit(main(['evaluate', {str(tmp_path / 'nab')!r}, '--jobs', '2', '--json', {str(out_json)!r}, "
            "'--no-progress']))\n")
    run_isolated(["-c", code], timeout=20)
    assert json.loads(out_json.read_text())["format"] == "nab"


def test_smd_layout_on_synthetic_machines(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(7500)
    # three metrics sharing one cycle (as load-driven server metrics do), with different phases
    base = np.column_stack([np.sin(2 * np.pi * t / 50 + phase) for phase in (0.0, 1.0, 2.5)]) * 0.3 + 0.5
    base += 0.01 * rng.standard_normal(base.shape)
    test = base[6000:].copy()
    labels = np.zeros(1500, dtype=np.int64)
    test[700:760, 1] = 0.95
    labels[700:760] = 1
    np.save(tmp_path / "machine-9-9_train.npy", base[:6000].astype(np.float32))
    np.save(tmp_path / "machine-9-9_test.npy", test.astype(np.float32))
    np.save(tmp_path / "machine-9-9_test_label.npy", labels)
    out_json = tmp_path / "smd.json"
    assert evaluate(tmp_path, "--json", out_json, "--plots", tmp_path / "p", "--no-progress") == 0
    (row,) = json.loads(out_json.read_text())["series"]
    # the one anomaly is found (an alert inside its segment, hence inside its 100-row window)
    assert row["name"] == "machine-9-9" and row["pa_recall"] == 1.0 and row["window_recall"] == 1.0
    # the operating threshold is the detector's decision, as for every other input
    assert row["threshold"] == np.nextafter(0.5, -np.inf) and row["n_train"] == 0 and row["window"] >= 16
    # most alerts are the anomaly, and there are few of them
    assert row["precision"] > 0.5 and 0 < row["alerts"] < 100


def test_plot_events_and_table_by_hand() -> None:
    scores = np.array([0, 0, 0.2, 0, 0, 0.9, 0.8, 0, 0, 0.7])
    s = EvalSeries("a", np.zeros(10), scores, scores, np.array([0, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool), 0, 0.5,
                   [(1, 3)], info={"window": 2})
    events = find_plot_events([s], 5)
    assert [(e.kind, e.start, e.end) for e in events] == [("miss", 1, 3), ("false-alarm", 5, 6),
                                                           ("false-alarm", 9, 9)]
    assert events[0].badness == pytest.approx(0.5 / 0.2)
    s.metrics = {"rows": 10, "f1": 0.0, "threshold": 0.5}
    table = format_table([s], {})
    assert table.splitlines()[2].startswith("a ") and "0.500" in table


# -- issue 13, item 7: what a new user reads in the table ---------------------------------------------------


def _unlabelled_copy(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "unlabelled.csv"
    out.write_text("\n".join(line.rsplit(",", 1)[0] for line in path.read_text().splitlines()) + "\n")
    return out


def test_alerts_are_alert_events_as_the_daemon_raises_them(labelled: tuple, tmp_path: Path) -> None:
    """"alerts" counts what the daemon's alert policy would send (at the [alerts] defaults), fed the same flags
    through `anomalyd.alerts.manager.AlertManager`; "flagged" counts the rows over the threshold."""
    from anomalyd.alerts.manager import AlertManager
    from anomalyd.alerts.policy import ANOMALOUS
    from anomalyd.config import AlertsConfig
    from anomalyd.core.records import SeriesKey, WindowResult

    path, _, _ = labelled
    out_json = tmp_path / "r.json"
    assert evaluate(path, "--train-rows", 1200, "--json", out_json, "--no-progress") == 0
    (row,) = json.loads(out_json.read_text())["series"]
    s = csv_series(path, "--train-rows", 1200)
    flags = s.scores[1200:] > s.threshold
    scored = np.isfinite(s.errors[1200:])
    manager = AlertManager(AlertsConfig(sinks=("log",)), tmp_path / "alerts", dry_run=True)
    key = SeriesKey("ecg", ())
    results = [WindowResult(key, "m", int(t) - 10**9, int(t), 1.0, max_error=0.0 if ok else None,
                            anomalous=bool(f and ok), missing=not ok)
               for t, f, ok in zip(csv_times(s.scores.size)[1200:], flags, scored, strict=True)]
    opened = [t for t in manager.observe(results, now_ns=0) if t.kind == ANOMALOUS]
    assert row["flagged"] == int(np.count_nonzero(flags & scored)) == row["decisions"]
    assert row["alerts"] == len(opened)
    assert 0 < row["alerts"] < row["flagged"], "flagged rows close together are one alert, not one each"


def test_unlabelled_table_fills_rows_and_explains_zero_plots(labelled: tuple, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = labelled
    unlabelled = _unlabelled_copy(path, tmp_path)
    out_json = tmp_path / "u.json"
    # a threshold no score reaches: nothing flagged, so no alert to plot, and no label for misses
    assert evaluate(unlabelled, "--train-rows", 1200, "--threshold", 2.0, "--json", out_json, "--plots",
                    tmp_path / "p", "--no-progress") == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out_json.read_text())["series"]
    assert row["rows"] == 4000 - 1200 and row["alerts"] == 0 and row["flagged"] == 0
    header, _, line = out.splitlines()[:3]
    cols = header.split()
    assert line.split()[cols.index("rows")] == "2800"
    (wrote,) = [t for t in out.splitlines() if t.startswith("wrote 0 plots")]
    assert "no labels" in wrote and "no row was flagged" in wrote
    # labelled, with the same impossible threshold: every segment is a miss, so plots are written
    assert evaluate(path, "--train-rows", 1200, "--threshold", 2.0, "--plots", tmp_path / "q", "--no-progress") == 0
    assert "wrote 0 plots" not in capsys.readouterr().out


def test_slide_with_a_stored_model_is_refused_unless_it_is_the_models_own(labelled: tuple, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path, y, _ = labelled
    model = Detector(DetectorSpec(window=24, n_clusters=20, n_init=1, stride=2)).fit([y[:1500]])
    stored = StoredModel(model_id="ecg", signal="ecg", tags=(), scope="shared", model=model, period_ns=10**9,
                         train_start_ns=0, train_end_ns=1500 * 10**9)
    meta = catalog.save(tmp_path / "models", stored)
    capsys.readouterr()
    assert evaluate(path, "--model", meta, "--slide", 4, "--no-progress") == 2
    (err,) = capsys.readouterr().err.strip().splitlines()  # one line
    assert "--slide 4" in err and "own stride" in err and "every 2 row" in err
    assert evaluate(path, "--model", meta, "--slide", 2, "--no-progress") == 0
    assert evaluate(path, "--model", meta, "--no-progress") == 0


def test_nab_figures_at_the_operating_and_the_optimised_threshold_are_labelled(
        labelled: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = labelled
    out_json = tmp_path / "n.json"
    assert evaluate(path, "--train-rows", 1200, "--json", out_json, "--no-progress") == 0
    lines = [t for t in capsys.readouterr().out.splitlines() if t.startswith("NAB")]
    nab = json.loads(out_json.read_text())["summary"]["nab"]
    at, best = lines
    assert "operating threshold" in at and "optimised" not in at
    assert "optimised threshold" in best and "optimistic" in best
    for profile in ("standard", "reward_low_FP_rate", "reward_low_FN_rate"):
        assert f"{profile} {nab[profile]['score']:.2f}" in at
        assert f"{profile} {nab[profile]['optimised_score']:.2f} (score >= " in best


def _ucr_folder(tmp_path: Path) -> tuple[Path, list[tuple[str, int, int, int]]]:
    """Two synthetic UCR-style series (training part, then one labelled anomaly), as series.npz + index.csv."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows, arrays = [], {}
    for i, (kind, at) in enumerate((("beat_shape", 3500), ("noise_burst", 4200))):
        x, beats = ecg(5000, seed=i)
        y, found = inject(x, beats, (kind,), at, seed=i)
        a, b = found[0].start, found[0].end
        name = f"00{i + 1}_UCR_Anomaly_synthetic{i}_2000_{a + 1}_{b}"
        arrays[name] = np.asarray(y, dtype=np.float32)
        rows.append((name, 2000, a + 1, b))
    np.savez_compressed(tmp_path / "series.npz", **arrays)  # type: ignore[arg-type]
    lines = ["id,name,train_end,anomaly_start,anomaly_end,length"]
    lines += [f"{i + 1},{n},{t},{a},{b},5000" for i, (n, t, a, b) in enumerate(rows)]
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    return tmp_path, rows


def test_ucr_folder_is_read_directly_with_each_detector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, rows = _ucr_folder(tmp_path / "ucr")
    for name in ("kmeans", "fft", "kmeans+discord"):
        out = tmp_path / f"{name}.json"
        assert evaluate(folder, "--detector", name, "--json", out, "--no-progress") == 0
        report = json.loads(out.read_text())
        assert report["format"] == "ucr" and report["detector"]["scorer"] == name
        assert report["summary"]["ucr"]["series"] == 2
        for s, (_, train_end, _, _) in zip(report["series"], rows, strict=True):
            assert s["n_train"] == train_end and s["ucr_top1_score"] >= train_end
        assert "UCR top-1 within 100 rows" in capsys.readouterr().out
    # The same top-1 rule by hand on the kmeans report's own rows is what the summary counts.
    rep = json.loads((tmp_path / "kmeans.json").read_text())
    hits = sum(a - 1 - 100 <= s["ucr_top1_error"] <= b - 1 + 100
               for s, (_, _, a, b) in zip(rep["series"], rows, strict=True))
    assert rep["summary"]["ucr"]["hits_error"] == hits


def test_an_unknown_detector_exits_2_naming_the_choices(labelled: tuple, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = labelled[0]
    assert evaluate(path, "--detector", "wavelet") == 2
    assert "kmeans, fft, saliency, generalized, discord, nodata" in capsys.readouterr().err
