"""Readers of the labelled data that `anomalyd evaluate` and the benchmarks score: the NAB corpus, NAB's profiles and
published scores, a labelled CSV, SMD machines, the UCR archive's index, and label windows for an InfluxDB range.

Plain files in, arrays and `anomalyd.evaluation.nab` types out; errors name the file and the line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..core.records import rfc3339
from .nab import NabCorpus, NabFile, NabProfile

__all__ = [
    "UcrSeries",
    "find_smd_machines",
    "load_label_windows",
    "load_labelled_csv",
    "load_nab_corpus",
    "load_nab_profiles",
    "load_published_scores",
    "load_smd_machine",
    "load_ucr_index",
]


# ---------------------------------------------------------------------------------------------------------
# NAB: the corpus, the profiles and published scores
# ---------------------------------------------------------------------------------------------------------


def _parse_timestamps(texts: Sequence[str], where: str) -> NDArray[np.datetime64]:
    try:
        return np.array(texts, dtype="datetime64[us]")
    except ValueError as exc:
        raise ValueError(f"{where}: cannot parse timestamps as 'YYYY-MM-DD HH:MM:SS': {exc}") from exc


def _read_nab_csv(path: Path) -> tuple[NDArray[np.datetime64], NDArray[np.float64]]:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["timestamp", "value"]:
            raise ValueError(f"{path}: header must be 'timestamp,value', got {header!r}")
        texts: list[str] = []
        values: list[float] = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                texts.append(row[0])
                values.append(float(row[1]))
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: expected 'timestamp,value', got {row!r}") from exc
    return _parse_timestamps(texts, str(path)), np.asarray(values, dtype=np.float64)


def load_nab_corpus(root: Path | str, probation_fraction: float = 0.15) -> NabCorpus:
    """Load the NAB corpus: ``data/*/*.csv`` and ``labels/combined_windows.json`` under ``root``.

    Parameters
    ----------
    root : Path or str
        The NAB folder, holding ``data/`` and ``labels/``.
    probation_fraction : float, default 0.15
        NAB's probationary fraction.

    Returns
    -------
    NabCorpus
        The files in sorted relative-path order (``"realKnownCause/nyc_taxi.csv"``), rows as in the files.

    Raises
    ------
    FileNotFoundError
        When ``data/`` holds no CSV file or the labels file is missing.
    ValueError
        When a data file has no labels entry, a malformed row, or a window bound that is not one of its
        timestamps.
    """
    root = Path(root)
    data_dir = root / "data"
    labels_path = root / "labels" / "combined_windows.json"
    paths = sorted(data_dir.glob("*/*.csv"))
    if not paths:
        raise FileNotFoundError(f"no NAB data files under {data_dir}; root must be the folder holding data/")
    if not labels_path.is_file():
        raise FileNotFoundError(f"NAB labels {labels_path} not found")
    windows_json = json.loads(labels_path.read_text())
    files: dict[str, NabFile] = {}
    for path in paths:
        name = path.relative_to(data_dir).as_posix()
        if name not in windows_json:
            raise ValueError(f"{labels_path} has no windows for {name!r} (an empty list means no anomaly)")
        timestamps, values = _read_nab_csv(path)
        flat = [t for pair in windows_json[name] for t in pair]
        bounds = _parse_timestamps(flat, f"{labels_path} [{name}]")
        windows = tuple((bounds[i], bounds[i + 1]) for i in range(0, bounds.size, 2))
        files[name] = NabFile(name=name, timestamps=timestamps, windows=windows, values=values)
    return NabCorpus(files, probation_fraction=probation_fraction)


def load_nab_profiles(path: Path | str) -> dict[str, NabProfile]:
    """Read NAB's ``config/profiles.json`` (``{name: {"CostMatrix": {"tpWeight": ..., ...}}}``).

    Parameters
    ----------
    path : Path or str
        The profiles file.

    Returns
    -------
    dict of str to NabProfile
        The profiles by name.
    """
    path = Path(path)
    document = json.loads(path.read_text())
    profiles: dict[str, NabProfile] = {}
    for name, entry in document.items():
        try:
            costs = entry["CostMatrix"]
            profiles[name] = NabProfile(
                tp_weight=float(costs["tpWeight"]),
                fp_weight=float(costs["fpWeight"]),
                fn_weight=float(costs["fnWeight"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path}: profile {name!r} needs CostMatrix.tpWeight, .fpWeight and .fnWeight as numbers"
            ) from exc
    return profiles


def load_published_scores(
    path: Path | str, corpus: NabCorpus | None = None
) -> dict[str, NDArray[np.float64]]:
    """Read a published NAB score file (``file,timestamp,anomaly_score``, optionally gzip-compressed).

    Parameters
    ----------
    path : Path or str
        E.g. ``results/published_numenta_scores.csv.gz``; ``file`` holds data-relative paths such as
        ``realKnownCause/nyc_taxi.csv``.
    corpus : NabCorpus, optional
        When given, every corpus file must be present with as many rows as the data file and the same
        timestamps (as a multiset: see Notes).

    Returns
    -------
    dict of str to ndarray of float
        Scores per file, in the score file's row order.

    Raises
    ------
    ValueError
        On a malformed row, or a mismatch with ``corpus``.

    Notes
    -----
    NAB pairs a detector's scores with the data rows by position, not by timestamp, and so does
    `nab_score`. This matters for one published file: the randomCutForest scores of
    ``realKnownCause/machine_temperature_system_failure.csv`` list the rows around the backwards time step
    in sorted timestamp order, not in the data file's order; NAB's published results score them by position,
    so the check against ``corpus`` compares timestamps as a multiset only.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    reader = csv.reader(io.StringIO(raw.decode("utf-8")))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["file", "timestamp", "anomaly_score"]:
        raise ValueError(f"{path}: header must be 'file,timestamp,anomaly_score', got {header!r}")
    texts: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            name = row[0].replace("\\", "/").removeprefix("./")
            stamp, score = row[1], float(row[2])
        except (IndexError, ValueError) as exc:
            raise ValueError(
                f"{path}:{line_no}: expected 'file,timestamp,anomaly_score', got {row!r}"
            ) from exc
        texts.setdefault(name, []).append(stamp)
        scores.setdefault(name, []).append(score)
    result = {name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}
    if corpus is not None:
        for name, f in corpus.files.items():
            if name not in result:
                raise ValueError(f"{path} has no scores for corpus file {name!r}")
            stamps = np.sort(_parse_timestamps(texts[name], f"{path} [{name}]"))
            expected = np.sort(np.asarray(f.timestamps))
            if stamps.shape != expected.shape:
                raise ValueError(
                    f"{path}: {name!r} has {stamps.size} scores but the data file has {expected.size} rows"
                )
            if not np.array_equal(stamps, expected):
                bad = int(np.flatnonzero(stamps != expected)[0])
                raise ValueError(
                    f"{path}: the timestamps of {name!r} are not those of the data file "
                    f"(first difference at {stamps[bad]} vs {expected[bad]})"
                )
    return result


# ---------------------------------------------------------------------------------------------------------
# A labelled CSV, SMD machines, the UCR index
# ---------------------------------------------------------------------------------------------------------


def load_labelled_csv(path: Path | str) -> tuple[list[str], NDArray[np.float64], NDArray[np.bool_] | None]:
    """Read a ``timestamp,value[,label]`` CSV (one row per sample, in time order).

    Parameters
    ----------
    path : Path or str
        The file. An empty ``value`` is read as NaN (a missing sample); ``label`` is 0 or 1.

    Returns
    -------
    timestamps : list of str
        The timestamps as written (only used to label the output).
    values : ndarray of float
        The samples.
    labels : ndarray of bool or None
        The labels, or None when the file has no ``label`` column.

    Raises
    ------
    ValueError
        On a wrong header, a malformed row or a label other than 0/1, naming the line.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if header not in (["timestamp", "value"], ["timestamp", "value", "label"]):
            raise ValueError(f"{path}: header must be 'timestamp,value' or 'timestamp,value,label', got "
                             f"{','.join(header)!r}")
        has_label = len(header) == 3
        stamps: list[str] = []
        values: list[float] = []
        labels: list[bool] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} columns ({','.join(header)}), got "
                                 f"{row!r}")
            stamps.append(row[0])
            try:
                values.append(float(row[1]) if row[1].strip() else math.nan)
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: value {row[1]!r} is not a number") from exc
            if has_label:
                label = row[2].strip()
                if label not in ("0", "1", "0.0", "1.0", "true", "false", "True", "False"):
                    raise ValueError(f"{path}:{line_no}: label {label!r} must be 0 or 1")
                labels.append(label in ("1", "1.0", "true", "True"))
    if not values:
        raise ValueError(f"{path}: no data rows after the header")
    return stamps, np.asarray(values, dtype=np.float64), np.asarray(labels, dtype=bool) if has_label else None


def find_smd_machines(root: Path | str) -> list[str]:
    """Machine ids (``"1-6"``) with train, test and test_label files under an SMD-layout directory."""
    root = Path(root)
    ids = sorted(p.name.removeprefix("machine-").removesuffix("_train.npy") for p in root.glob("machine-*_train.npy"))
    return [m for m in ids if (root / f"machine-{m}_test.npy").is_file()
            and (root / f"machine-{m}_test_label.npy").is_file()]


def load_smd_machine(root: Path | str, machine: str) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                                              NDArray[np.bool_]]:
    """Read one SMD machine: ``machine-<id>_{train,test,test_label}.npy`` (plain arrays, no pickle).

    Returns
    -------
    train, test : ndarray of float, shape (n, d)
        Training and test rows.
    labels : ndarray of bool, shape (n_test,)
        Test labels.
    """
    root = Path(root)
    try:
        train = np.load(root / f"machine-{machine}_train.npy", allow_pickle=False).astype(np.float64)
        test = np.load(root / f"machine-{machine}_test.npy", allow_pickle=False).astype(np.float64)
        labels = np.load(root / f"machine-{machine}_test_label.npy", allow_pickle=False).astype(bool)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"SMD machine {machine!r} is incomplete under {root}: {exc.filename} is missing; "
                                f"found machines {find_smd_machines(root)}") from exc
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1] or labels.shape != (test.shape[0],):
        raise ValueError(f"SMD machine {machine}: shapes train {train.shape}, test {test.shape}, labels "
                         f"{labels.shape} do not fit together (rows x metrics, one label per test row)")
    return train, test, labels


@dataclass(frozen=True)
class UcrSeries:
    """One series of the UCR anomaly archive's index (0-based rows: training ``[0, train_end)``, the anomaly
    ``[anomaly_first, anomaly_last]``)."""

    name: str
    train_end: int
    anomaly_first: int
    anomaly_last: int
    length: int


def load_ucr_index(root: Path | str) -> list[UcrSeries]:
    """The series of a UCR folder's ``index.csv`` (1-based inclusive indices in the file, as in the archive)."""
    path = Path(root) / "index.csv"
    out = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                out.append(UcrSeries(row["name"], int(row["train_end"]), int(row["anomaly_start"]) - 1,
                                     int(row["anomaly_end"]) - 1, int(row["length"])))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}: row {row} is not id,name,train_end,anomaly_start,anomaly_end,length "
                                 f"({exc})") from exc
    return out


# ---------------------------------------------------------------------------------------------------------
# Label windows of an InfluxDB range
# ---------------------------------------------------------------------------------------------------------


_LABEL_LAYOUT = 'write a list of ["start", "end"] pairs, or {"<series>": [["start", "end"], ...]}'


def load_label_windows(path: Path | str, series: Sequence[str], start_ns: int, end_ns: int,
                       now_ns: int | None = None) -> dict[str, list[tuple[int, int]]]:
    """Read the label windows of an InfluxDB range: epoch-ns ``(first, last)`` pairs per series.

    Parameters
    ----------
    path : Path or str
        JSON: a list of ``[start, end]`` pairs applying to every series, or NAB-style
        ``{"<series>": [[start, end], ...]}`` keyed by the series' tags as `anomalyd.core.records.tags_str` renders
        them (``"host=h1"``; ``""`` for a signal without ``group_by``). In the keyed form every series read needs
        a key (an empty list means no anomaly). Bounds are RFC 3339 times (or ``now``, ``now-2h``), inclusive.
    series : sequence of str
        The series read, as tags strings.
    start_ns, end_ns : int
        The evaluated range. A window must overlap it; one reaching past either end is clipped to it.
    now_ns : int, optional
        What ``now`` means in the bounds (default: the current time).

    Returns
    -------
    dict of str to list of (int, int)
        The windows of each series, sorted and clipped to the range.

    Raises
    ------
    ValueError
        Naming the file and the window: not JSON, a wrong layout, a bound that is not a time, a start after its
        end, a window outside the range, a key that is not a series read, or a series without a key.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = Path(d) / "labels.json"
    ...     _ = p.write_text('{"host=a": [["1970-01-01T00:00:10Z", "1970-01-01T00:00:20Z"]], "host=b": []}')
    ...     load_label_windows(p, ["host=a", "host=b"], 0, 60 * 10**9)
    {'host=a': [(10000000000, 20000000000)], 'host=b': []}
    """
    import time

    from ..config import parse_time_ns

    path = Path(path)
    now = time.time_ns() if now_ns is None else now_ns
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"labels {path} is not valid JSON ({exc}); {_LABEL_LAYOUT}") from None
    except OSError as exc:
        raise ValueError(f"labels {path} cannot be read ({exc.strerror}); pass an existing JSON file to --labels"
                         ) from None
    known = list(series)
    entries: Mapping[str, Any]
    if isinstance(doc, list):
        entries = dict.fromkeys(known, doc)
    elif isinstance(doc, dict):
        unknown = [k for k in doc if k not in known]
        if unknown:
            raise ValueError(f"labels {path}: {unknown[0]!r} is not a series read from the range; the series are "
                             f"{', '.join(repr(k) for k in known)} (tags as k=v,k=v, sorted by key)")
        missing = [k for k in known if k not in doc]
        if missing:
            raise ValueError(f"labels {path} have no windows for series {missing[0]!r}; add it (an empty list means "
                             "no anomaly)")
        entries = doc
    else:
        raise ValueError(f"labels {path}: the top level is a JSON {type(doc).__name__}; {_LABEL_LAYOUT}")
    span = f"{rfc3339(start_ns)} .. {rfc3339(end_ns)}"
    out: dict[str, list[tuple[int, int]]] = {}
    for name in known:
        pairs = entries[name]
        where = f"labels {path}" if isinstance(doc, list) else f"labels {path} [{name!r}]"
        if not isinstance(pairs, list):
            raise ValueError(f"{where}: expected a list of [start, end] pairs, got {pairs!r}; {_LABEL_LAYOUT}")
        windows: list[tuple[int, int]] = []
        for i, pair in enumerate(pairs, start=1):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"{where} window {i}: expected [start, end] as two RFC 3339 strings, got {pair!r}")
            try:
                a, b = (parse_time_ns(t, now) for t in pair)
            except ValueError as exc:
                raise ValueError(f"{where} window {i}: {exc}") from None
            if a > b:
                raise ValueError(f"{where} window {i}: start {pair[0]} is after end {pair[1]}; swap them")
            if b < start_ns or a > end_ns:
                raise ValueError(f"{where} window {i} ({pair[0]} .. {pair[1]}) lies outside the evaluated range "
                                 f"{span}; widen --start/--end or fix the window (times without a zone are UTC)")
            windows.append((max(a, start_ns), min(b, end_ns)))
        out[name] = sorted(windows)
    return out

