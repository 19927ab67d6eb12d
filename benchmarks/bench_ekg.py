"""The EKG reference case (issue 11): train on norm.txt, score anomaly.txt (window 32), as
tests/test_detector.py::test_reference_ekg_both_dropouts_and_no_false_alarm does; prints each dropout's best score
over the decision threshold (the ratio) and the flagged windows that cover no dropout (false windows).

Usage::

    .venv/bin/python benchmarks/bench_ekg.py [--spec '{"normaliser_unsaturated": true}']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from anomalyd.core.detector import Detector, DetectorSpec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "ekg"
DROPOUTS = ((210, 215), (8010, 8014))


def _read(path: Path) -> np.ndarray:
    """Line protocol, one ``signal_value`` a second (the test's reader)."""
    return np.array([float(line.split(" ")[1].split("=")[1]) for line in path.read_text().splitlines()],
                    dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="EKG folder (default %(default)s)")
    p.add_argument("--spec", default="{}", help="JSON of `DetectorSpec.with_overrides` arguments")
    args = p.parse_args(argv)
    norm, anomaly = _read(args.data / "norm.txt"), _read(args.data / "anomaly.txt")
    spec = DetectorSpec(window=32).with_overrides(**json.loads(args.spec))
    det = Detector(spec).fit([norm])
    b = det.update(det.start(0), anomaly)
    w = det.window_
    end_pos = b.position  # a window ends at its position
    hit = np.zeros(len(anomaly), dtype=bool)
    parts = []
    for start, end in DROPOUTS:
        cov = (end_pos >= start) & (end_pos - w + 1 < end)
        hit |= cov
        best = float(np.nanmax(b.score[cov & b.complete]))
        parts.append(f"dropout {start}-{end - 1}: best score {best:.4f}, ratio {best / spec.score_threshold:.3f}, "
                     f"flagged {bool(b.anomalous[cov].any())}")
    normal = b.complete & ~hit
    parts.append(f"false windows {int(b.anomalous[~hit].sum())}, normal max score {np.nanmax(b.score[normal]):.4f}")
    print("EKG: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
