"""Per-series training in parallel (issue 12): local processes (``--jobs``) and a Dask cluster (``--dask``) save
the same models as one process; a series that cannot be trained is reported and the others are saved."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from anomalyd.cli import main
from anomalyd.config import Config, load
from anomalyd.demo.synthetic import ecg
from anomalyd.service import training
from anomalyd.service.catalog import load as load_model
from anomalyd.store.base import SeriesPoints
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd

N_SERIES = 12
N_SAMPLES = 2000  # per series, 1 s apart: 33 minutes
SHORT = "p99"  # a series with too little data for its window
FAILED_ID = f"heartbeat|patient={SHORT}"

_CONFIG = """
[influxdb]
url = "{url}"
database = "{db}"
[paths]
models = "{models}"
state = "{state}"
[daemon]
health_listen = ""
[[signals]]
name = "heartbeat"
measurement = "ecg"
field = "value"
group_by = ["patient"]
period = "1s"
clusters = 40
train_range = ["now-2h", "now"]
"""


class Fed:
    def __init__(self, url: str, db: str, tmp: Path) -> None:
        self.url, self.db, self.tmp = url, db, tmp

    def config_file(self, name: str) -> Path:
        """A config file whose models go to ``<tmp>/<name>/models``."""
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        path = d / "config.toml"
        path.write_text(_CONFIG.format(url=self.url, db=self.db, models=d / "models", state=d / "state"))
        return path

    def config(self, name: str) -> Config:
        return load(self.config_file(name), env={})


@pytest.fixture(scope="module")
def fed(influxd: LocalInfluxd, tmp_path_factory: pytest.TempPathFactory) -> Fed:
    """12 series of synthetic ECG (2,000 samples each, different seeds) and one of 20 samples, in a database of the
    session's influxd."""
    db = f"par{os.getpid()}"
    influxd.query(f'CREATE DATABASE "{db}"')
    f = Fed(influxd.url, db, tmp_path_factory.mktemp("parallel"))
    cfg = f.config("feed")
    end = (time.time_ns() // 10**9 - 60) * 10**9
    blocks = []
    for i in range(N_SERIES):
        x, _ = ecg(N_SAMPLES, seed=100 + i)
        times = end - np.arange(N_SAMPLES, dtype=np.int64)[::-1] * 10**9
        blocks.append(SeriesPoints("ecg", (("patient", f"p{i:02d}"),), ("value",), (x.tolist(),), times.tolist()))
    x, _ = ecg(20, seed=99)
    blocks.append(SeriesPoints("ecg", (("patient", SHORT),), ("value",), (x.tolist(),),
                               (end - np.arange(20, dtype=np.int64)[::-1] * 10**9).tolist()))
    InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch).write(blocks)
    return f


def _models(models: Path) -> dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """Each saved model's fitted state (cluster centres, thresholds, normaliser...), by model id."""
    out = {}
    for p in sorted(models.glob("*.json")):
        m = load_model(p)
        out[m.model_id] = m.model.to_state()
    return out


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for mid in a:
        (arrays_a, meta_a), (arrays_b, meta_b) = a[mid], b[mid]
        assert meta_a == meta_b, mid  # thresholds, window, shapes, normaliser...
        assert sorted(arrays_a) == sorted(arrays_b)
        for k in arrays_a:  # bit for bit: the cluster centres and the rest
            assert np.array_equal(arrays_a[k], arrays_b[k], equal_nan=True), (mid, k)


def _check_report(report: training.TrainReport) -> None:
    assert list(report.failed) == [FAILED_ID]
    assert "needs a gap-free training stretch" in report.failed[FAILED_ID]
    assert [dict(m.tags)["patient"] for m in report.trained] == [f"p{i:02d}" for i in range(N_SERIES)]


@pytest.fixture(scope="module")
def sequential(fed: Fed) -> dict[str, Any]:
    """The models trained in this process, one series after another (the reference)."""
    cfg = fed.config("sequential")
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    report = training.train(cfg, store, progress=False)
    _check_report(report)
    models = _models(cfg.paths.models)
    assert len(models) == N_SERIES
    return models


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


class _Bar:
    """Records how tqdm is advanced."""

    steps: ClassVar[list[int]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.total = kwargs["total"]

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.steps.append(n)


def test_two_processes_save_the_same_models_and_advance_the_bar(fed: Fed, sequential: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = fed.config("jobs2")
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    monkeypatch.setattr(training, "tqdm", _Bar)
    _Bar.steps = []
    report = training.train(cfg, store, jobs=2)
    _check_report(report)
    assert _Bar.steps == [1] * (N_SERIES + 1)  # one step per series as its fit completes, none in bulk
    _assert_same(_models(cfg.paths.models), sequential)


def test_a_local_dask_cluster_saves_the_same_models(fed: Fed, sequential: dict[str, Any], cluster: Any) -> None:
    cfg = fed.config("dask")
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    report = training.train(cfg, store, progress=False, dask=cluster.scheduler_address)
    _check_report(report)
    _assert_same(_models(cfg.paths.models), sequential)


def test_cli_train_on_the_dask_cluster(fed: Fed, sequential: dict[str, Any], cluster: Any,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = fed.config_file("cli-dask")
    assert main(["train", "-c", str(path), "--dask", cluster.scheduler_address]) == 1  # the short series failed
    out, err = capsys.readouterr()
    assert out.count("trained heartbeat-") == N_SERIES
    assert f"FAILED  {FAILED_ID}: window=" in err and "1 of 13 failed" in err
    _assert_same(_models(path.parent / "models"), sequential)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("anomalyd train:")]
    assert len(lines) == 1
    return lines[0]


def test_a_bad_dask_address_is_one_line_with_the_fix(fed: Fed, capsys: pytest.CaptureFixture[str]) -> None:
    import dask.config

    path = fed.config_file("bad")
    address = f"tcp://127.0.0.1:{_closed_port()}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["train", "-c", str(path), "--dask", address]) == 1
    line = _error_line(capsys)
    assert f"cannot reach the Dask scheduler at {address}" in line
    assert f"`dask worker {address}`" in line and "fix --dask" in line
    assert main(["train", "-c", str(path), "--dask", "http://127.0.0.1:8786"]) == 1
    assert "unknown address scheme 'http'" in _error_line(capsys)
    assert not (path.parent / "models").exists()  # nothing trained


def test_dask_without_the_extra_names_it(fed: Fed, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    assert main(["train", "-c", str(fed.config_file("noextra")), "--dask", "tcp://127.0.0.1:8786"]) == 1
    line = _error_line(capsys)
    assert "--dask needs the dask extra" in line and "pip install 'anomalyd[dask]'" in line


def test_jobs_must_be_positive_and_not_with_dask(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--jobs", "0"], ["--jobs", "two"], ["--jobs", "2", "--dask", "tcp://h:8786"]):
        with pytest.raises(SystemExit) as exc:
            main(["train", *argv])
        assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_few_series_train_in_this_process_by_default(fed: Fed, sequential: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --jobs, 13 series (fewer than PARALLEL_MIN_SERIES) are fitted here: no worker process."""
    import joblib

    def no_pool(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a process pool was started")

    monkeypatch.setattr(joblib, "Parallel", no_pool)
    cfg = fed.config("auto")
    report = training.train(cfg, InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch), progress=False, jobs=None)
    _check_report(report)
    _assert_same(_models(cfg.paths.models), sequential)
