"""Shared fixtures: a real influxd per test session, configs pointing at it, the reference data."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from anomalyd.config import Config, from_dict
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import InfluxdMissingError, LocalInfluxd

ROOT = Path(__file__).resolve().parents[1]
#: The reference and benchmark data (never copied into the project): ../shared/data beside the project, or the
#: folder named by $ANOMALYD_SHARED_DATA when the checkout lives elsewhere.
SHARED_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data")
NAB = SHARED_DATA / "nab"
WHERE = "the tests read ../shared/data beside the project, or the folder $ANOMALYD_SHARED_DATA names"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"reference data not found at {SHARED_DATA}; {WHERE}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfluxd]:
    """A real influxd on a free loopback port in a temporary directory, stopped after the session."""
    try:
        server = LocalInfluxd(tmp_path_factory.mktemp("influxd")).start()
    except InfluxdMissingError as exc:
        pytest.fail(f"{exc} (the store and end-to-end tests need a real InfluxDB; .ci/run installs it)")
    yield server
    server.stop()


_CLI_CONFIG = """
[influxdb]
url = "{url}"
database = "{db}"
[paths]
models = "models"
state = "state"
[daemon]
lateness = "0s"
health_listen = ""
[[signals]]
name = "heartbeat"
measurement = "ecg"
field = "value"
group_by = ["patient"]
period = "1s"
clusters = 100
train_range = ["now-3h", "now-1h"]
{extra}
"""


def cli_config(url: str, db: str, extra: str = "") -> str:
    """A config file's text for the CLI tests: the synthetic heartbeat signal, with ``extra`` TOML lines after
    the signal's keys."""
    return _CLI_CONFIG.format(url=url, db=db, extra=extra)


def make_config(url: str, database: str, tmp: Path, signals: list[dict] | None = None, **sections: dict) -> Config:
    """A validated Config for tests: given signals (default: the synthetic heartbeat) and section overrides."""
    raw: dict = {
        "influxdb": {"url": url, "database": database, "timeout": "5s", "retries": 0},
        "output": {"write_reconstruction": True},
        "paths": {"models": str(tmp / "models"), "state": str(tmp / "state")},
        "daemon": {"interval": "1s", "lateness": "0s", "health_listen": ""},
        "signals": signals or [{"name": "heartbeat", "measurement": "ecg", "field": "value",
                                "group_by": ["patient"], "period": "1s", "clusters": 150,
                                "train_range": ["now-7h", "now-1h"]}],
    }
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return from_dict(raw, env={})


@pytest.fixture
def database(influxd: LocalInfluxd) -> str:
    """A fresh database name on the session's influxd (created)."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    influxd.query(f'CREATE DATABASE "{name}"')
    return name


@pytest.fixture
def cfg(influxd: LocalInfluxd, database: str, tmp_path: Path) -> Config:
    return make_config(influxd.url, database, tmp_path)


@pytest.fixture
def store(cfg: Config) -> InfluxDB1Store:
    return InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)


def with_signal(cfg: Config, **changes: object) -> Config:
    """A copy of ``cfg`` whose first signal has ``changes`` applied."""
    return replace(cfg, signals=(replace(cfg.signals[0], **changes), *cfg.signals[1:]))


@dataclass
class DemoDB:
    url: str
    database: str
    cfg: Config


@pytest.fixture(scope="session")
def demo_db(influxd: LocalInfluxd, tmp_path_factory: pytest.TempPathFactory) -> DemoDB:
    """A real demo run on the session's influxd: config.toml's signal fed (7 h), trained, and one live tick."""
    import time

    from anomalyd.config import load
    from anomalyd.demo.run import demo_config, feed
    from anomalyd.service import training
    from anomalyd.service.catalog import Catalog
    from anomalyd.service.state import Watermarks
    from anomalyd.service.worker import Worker

    name = f"demo{os.getpid()}"
    base = load(ROOT / "config.toml", env={})
    cfg = demo_config(base, tmp_path_factory.mktemp("demo"), influxd.url)
    cfg = replace(cfg, influxdb=replace(cfg.influxdb, database=name))
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    now = time.time_ns() // 10**9 * 10**9
    feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    report = training.train(cfg, store, now_ns=now, progress=False)
    assert not report.failed, report.failed
    Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
           clock=lambda: now).tick()
    return DemoDB(influxd.url, name, cfg)


@dataclass
class AuthInfluxd:
    """A real influxd with authentication on (``INFLUXDB_HTTP_AUTH_ENABLED``) and an admin user."""

    server: LocalInfluxd
    user: str
    password: str

    @property
    def url(self) -> str:
        return self.server.url

    def query(self, q: str, db: str = "") -> dict:
        import requests

        r = requests.post(f"{self.url}/query", params={"q": q, "db": db}, auth=(self.user, self.password),
                          timeout=30)
        r.raise_for_status()
        return dict(r.json())


@pytest.fixture(scope="session")
def influxd_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthInfluxd]:
    """A second real influxd, with authentication on: /ping answers anyone, queries need a valid user."""
    old = os.environ.get("INFLUXDB_HTTP_AUTH_ENABLED")
    os.environ["INFLUXDB_HTTP_AUTH_ENABLED"] = "true"  # LocalInfluxd passes the environment on to influxd
    try:
        server = LocalInfluxd(tmp_path_factory.mktemp("influxd_auth")).start()
    except InfluxdMissingError as exc:
        pytest.fail(f"{exc} (the store and end-to-end tests need a real InfluxDB; .ci/run installs it)")
    finally:
        if old is None:
            del os.environ["INFLUXDB_HTTP_AUTH_ENABLED"]
        else:
            os.environ["INFLUXDB_HTTP_AUTH_ENABLED"] = old
    auth = AuthInfluxd(server, "admin", "right-pw")
    try:
        # With no user yet, influxd accepts the statement that creates the first admin.
        server.query(f"CREATE USER {auth.user} WITH PASSWORD '{auth.password}' WITH ALL PRIVILEGES")
        yield auth
    finally:
        server.stop()
