"""The daemon path on NAB: every file written into a real InfluxDB, `anomalyd train` + `anomalyd score`, the
points read back and scored with the NAB scorer, next to `anomalyd evaluate` on the same files.

Usage::

    .venv/bin/python benchmarks/bench_replay.py [--data ../shared/data/nab] [--keep DIR]

What it does, with the shipped defaults (one configuration for every file):
1. starts a private influxd (as the tests do) and writes the 58 NAB files with their own timestamps, one series
   each (measurement ``nab``, tag ``file``);
2. writes a config with one signal per file: ``period`` = the file's median step, ``train_range`` = its
   probationary period (NAB's rule: the first min(15%, 750) rows), everything else left at its default;
3. runs the CLI as an operator would: ``anomalyd train -c nab.toml`` once, then ``anomalyd score -c nab.toml
   --signal <file> --start <training end> --end <last row>`` for each file;
4. reads every point back from ``anomaly_error`` and lines them up with the file's rows by timestamp (a join on
   time: each point carries the timestamp of its window's last sample);
5. scores the written ``anomalous`` field (the decision Slack and the Kapacitor templates alert on) and the
   written ``score`` with the project's NAB scorer, and compares with ``anomalyd evaluate <nab> --json``;
6. checks the points against the in-memory path (`anomalyd.core.stored_run.run_stored`) window by window.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anomalyd.config import load
from anomalyd.core.stored_run import infer_period, run_stored
from anomalyd.evaluation.datasets import load_nab_corpus
from anomalyd.evaluation.nab import NAB_PROFILES, best_nab_threshold, nab_probation, nab_score
from anomalyd.store.local import LocalInfluxd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "nab"
ANOMALYD = str(Path(sys.executable).with_name("anomalyd"))


def _iso(ns: int) -> str:
    return str(np.datetime64(int(ns), "ns")) + "Z"


def _signal_name(file: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", file.removesuffix(".csv"))


def _cli(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([ANOMALYD, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    corpus = load_nab_corpus(args.data)
    work = args.keep or Path(tempfile.mkdtemp(prefix="anomalyd-replay-"))
    work.mkdir(parents=True, exist_ok=True)
    server = LocalInfluxd(work / "influxd").start()
    try:
        server.query('CREATE DATABASE "nab"')
        files = {}
        signals = []
        for name, f in corpus.files.items():
            t = np.asarray(f.timestamps).astype("datetime64[ns]").astype(np.int64)
            v = np.asarray(f.values, dtype=np.float64)
            n_train = nab_probation(len(t))
            sig = _signal_name(name)
            files[sig] = (name, t, v, n_train)
            server.write_lines("nab", "\n".join(f"nab,file={sig} value={x!r} {s}"
                                                for s, x in zip(t.tolist(), v.tolist(), strict=True)))
            signals.append(f'[[signals]]\nname = "{sig}"\nmeasurement = "nab"\nfield = "value"\n'
                           f'where = {{ file = "{sig}" }}\ngroup_by = ["file"]\nperiod = "{infer_period(t)}ns"\n'
                           f'train_range = ["{_iso(t.min())}", "{_iso(t[n_train - 1])}"]\n')
        cfg_path = work / "nab.toml"
        cfg_path.write_text(f'[influxdb]\nurl = "{server.url}"\ndatabase = "nab"\n\n[paths]\nmodels = "models"\n'
                            f'state = "state"\n\n[daemon]\nhealth_listen = ""\n\n' + "\n".join(signals))
        cfg = load(cfg_path, env={})
        t_train = _cli("train", "-c", str(cfg_path))
        t_score = 0.0
        for sig in cfg.signals:
            _, t, _, n_train = files[sig.name]
            t_score += _cli("score", "-c", str(cfg_path), "--signal", sig.name, "--start", _iso(t[n_train - 1]),
                            "--end", _iso(int(t.max()) + sig.period_ns))
        # Read back and line up with the rows.
        by_file_anom: dict[str, np.ndarray] = {}
        by_file_score: dict[str, np.ndarray] = {}
        mismatches = compared = 0
        from anomalyd.service.catalog import Catalog, model_id_for

        catalog = Catalog(cfg.paths.models)
        for sig in cfg.signals:
            name, t, v, n_train = files[sig.name]
            res = server.query(f'SELECT "score", "anomalous", "max_error" FROM "anomaly_error" WHERE '
                               f'"signal" = \'{sig.name}\'', "nab")["results"][0]
            rows = [r for s in res.get("series", []) for r in s["values"]]
            score = {r[0]: r[1] for r in rows if r[1] is not None}
            anom = {r[0]: bool(r[2]) for r in rows}
            by_file_score[name] = np.array([score.get(int(x), 0.0) for x in t])
            by_file_anom[name] = np.array([1.0 if anom.get(int(x), False) else 0.0 for x in t])
            stored = catalog.get(model_id_for(sig.name, (("file", sig.name),), sig.scope))
            assert stored is not None
            run = run_stored(t, v, stored.train_end_ns, period_ns=sig.period_ns, max_gap=sig.max_gap,
                             detector=stored.model)
            offline = {int(s): j for j, s in enumerate(run.stamps) if run.written[j]}
            for r in rows:
                j = offline.get(r[0])
                compared += 1
                if j is None or (r[1] is not None and (r[1], r[3]) != (run.batch.score[j], run.batch.max_error[j])):
                    mismatches += 1
        out = {"files": len(files), "train_s": round(t_train, 1), "score_s": round(t_score, 1),
               "points_compared": compared, "points_differing_from_offline": mismatches}
        for label, scores in (("anomalous", by_file_anom), ("score", by_file_score)):
            for profile in NAB_PROFILES:
                norm, _, _ = nab_score(corpus, scores, float(np.nextafter(0.5, -np.inf)), profile)
                _, best_norm, _ = best_nab_threshold(corpus, scores, profile)
                out[f"{label}/{profile}"] = round(norm, 2)
                if label == "score":
                    out[f"{label}/{profile}/optimised"] = round(best_norm, 2)
        ev = work / "evaluate.json"
        subprocess.run([ANOMALYD, "evaluate", str(args.data), "--jobs", "2", "--no-progress", "--json", str(ev)],
                       check=True, stdout=subprocess.DEVNULL)
        nab = json.loads(ev.read_text())["summary"]["nab"]
        for profile in NAB_PROFILES:
            out[f"evaluate/{profile}"] = round(nab[profile]["score"], 2)
            out[f"evaluate/{profile}/optimised"] = round(nab[profile]["optimised_score"], 2)
        print(json.dumps(out, indent=2))
        ok = all(abs(out[f"anomalous/{p}"] - out[f"evaluate/{p}"]) <= 1.0 for p in NAB_PROFILES)
        ok &= all(abs(out[f"score/{p}"] - out[f"evaluate/{p}"]) <= 1.0 for p in NAB_PROFILES)
        print("daemon path within 1 point of `anomalyd evaluate` on every profile:", "yes" if ok else "NO")
        return 0 if ok and mismatches == 0 else 1
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
