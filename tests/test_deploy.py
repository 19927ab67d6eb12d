"""Deployment files: docker-compose, the Dockerfile, the systemd unit, Telegraf and Grafana provisioning.

Docker cannot run here, so the compose file and the Dockerfile are checked for what can be checked without it:
they parse, their images are pinned, and their hostnames, ports, paths, environment and commands agree with
config.toml (through the real config loader), the CLI (through its real argument parser) and the provisioning
files. The Dockerfile's HEALTHCHECK command is run for real against the daemon's health endpoint. The systemd
unit goes through ``systemd-analyze verify`` and ``security``, and the notify protocol through a real unix
datagram socket.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from anomalyd.cli import _parser
from anomalyd.config import load
from anomalyd.service.daemon import Health, Service, sd_notify, serve_http
from anomalyd.service.worker import TickReport
from anomalyd.store.local import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "daemon" / "Dockerfile"
UNIT = ROOT / "daemon" / "anomalyd.service"
TRAIN_UNIT = ROOT / "daemon" / "anomalyd-train.service"
DOCS = ROOT / "docs" / "deploy.md"
CONFIG_PATH = ROOT / "config.toml"
CONFIG = tomllib.loads(CONFIG_PATH.read_text())
IN_CONTAINER_CONFIG = "/etc/anomalyd/config.toml"
#: The unit's exposure score must stay at or below this (systemd calls < 2.0 "OK"); docs/deploy.md quotes it.
MAX_EXPOSURE = 2.0


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def anomalyd_services() -> dict[str, dict[str, Any]]:
    """Services that run the image built from daemon/Dockerfile."""
    return {n: s for n, s in services().items() if "build" in s}


def replicas() -> dict[str, dict[str, Any]]:
    """The services that run the daemon (``anomalyd run``), by name: the replicas that share the series out."""
    out = {}
    for name, svc in anomalyd_services().items():
        cmd = svc.get("command")
        if "entrypoint" not in svc and isinstance(cmd, list) and cmd[:1] == ["run"]:
            out[name] = svc
    return dict(sorted(out.items()))


def host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    assert u.hostname and u.port, f"{url} must name a host and a port"
    return u.hostname, u.port


def published(svc: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port) for a service's `ports`."""
    out = {}
    for spec in svc.get("ports", []):
        parts = str(spec).split(":")
        container = int(parts[-1].split("/")[0])
        hport = int(parts[-2])
        addr = parts[-3] if len(parts) == 3 else "0.0.0.0"
        out[container] = (addr, hport)
    return out


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target -> source for a service's short-syntax volumes (":ro" dropped)."""
    out = {}
    for spec in svc.get("volumes", []):
        parts = str(spec).split(":")
        out[parts[1]] = parts[0]
    return out


def config_with_env(env: dict[str, str]):  # type: ignore[no-untyped-def]
    """config.toml as the container sees it: the real loader with the service's environment overrides."""
    return load(CONFIG_PATH, env=env)


# --------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------------------
def test_compose_parses_and_has_the_stack() -> None:
    svcs = services()
    for name in ("influxdb", "kapacitor", "chronograf", "grafana", "anomalyd-0", "anomalyd-1", "demo-setup",
                 "demo-feeder"):
        assert name in svcs, f"docker-compose.yml has no {name} service"
    assert list(replicas()) == ["anomalyd-0", "anomalyd-1"], "the daemon runs as the replicas anomalyd-0 and -1"
    declared = set(compose().get("volumes") or {})
    for name, svc in svcs.items():
        for target, source in mounts(svc).items():
            if source.startswith((".", "/")):
                assert (ROOT / source).resolve().exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} ({target}) is not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in svcs, f"{name} depends on unknown service {dep}"


@pytest.mark.parametrize(("service", "repo", "series"), [
    ("influxdb", "influxdb", "1.8"), ("kapacitor", "kapacitor", "1.7"), ("chronograf", "chronograf", "1.10"),
    ("grafana", "grafana/grafana", ""), ("telegraf", "telegraf", "1."),
])
def test_images_are_pinned_to_full_versions(service: str, repo: str, series: str) -> None:
    image = services()[service]["image"]
    name, _, tag = image.rpartition(":")
    assert name == repo, image
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{service}: {image} is not pinned to a full x.y.z version"
    assert tag.startswith(series), f"{service}: {image} is not {repo} {series}"


def test_no_image_is_latest_or_untagged() -> None:
    text = COMPOSE_FILE.read_text()
    for name, svc in services().items():
        image = svc.get("image", "")
        if "build" in svc:
            assert image and not image.endswith(":latest"), f"{name}: give the built image a version tag"
            continue
        assert ":" in image.rsplit("/", 1)[-1], f"{name}: image {image} has no tag"
    assert not re.search(r"image:\s*\S+:latest\b", text)


def test_anomalyd_environment_agrees_with_config_and_services() -> None:
    svcs = services()
    influx_port = int(urlsplit(CONFIG["influxdb"]["url"]).port or 8086)
    kapacitor_port = int(urlsplit(CONFIG["kapacitor"]["url"]).port or 9092)
    health_port = int(CONFIG["daemon"]["health_listen"].rpartition(":")[2])
    assert anomalyd_services(), "no service builds daemon/Dockerfile"
    for name, svc in anomalyd_services().items():
        env = env_of(svc)
        assert svc["build"]["dockerfile"] == "daemon/Dockerfile" and (ROOT / svc["build"]["context"]).is_dir()
        cfg = config_with_env(env)  # the real loader: every override must be a known, valid key
        host, port = host_port(cfg.influxdb.url)
        assert host in svcs and port == influx_port, f"{name}: influxdb.url {cfg.influxdb.url}"
        assert cfg.influxdb.database == CONFIG["influxdb"]["database"]
        host, port = host_port(cfg.kapacitor.url)
        assert host == "kapacitor" and port == kapacitor_port, f"{name}: kapacitor.url {cfg.kapacitor.url}"
        listen_host, _, listen_port = cfg.daemon.health_listen.rpartition(":")
        assert listen_host == "0.0.0.0" and int(listen_port) == health_port, cfg.daemon.health_listen
        m = mounts(svc)
        assert m.get(IN_CONTAINER_CONFIG) == "./config.toml", f"{name}: config.toml is not mounted"
        # Every anomalyd container shares the models; the daemon replicas also keep state (the one-shot ones don't).
        for path in (cfg.paths.models, cfg.paths.state) if name in replicas() else (cfg.paths.models,):
            assert path.is_absolute() and str(path) in m, f"{name}: {path} is not a volume"
            assert not m[str(path)].startswith("."), f"{name}: {path} should be a named volume"
        assert cfg.paths.models != cfg.paths.state
    # Each replica's published health port reaches it, on the host's loopback only, on a host port of its own.
    host_ports = [published(svc)[health_port] for svc in replicas().values()]
    assert all(addr == "127.0.0.1" for addr, _ in host_ports), host_ports
    assert host_ports[0][1] == health_port, "anomalyd-0 keeps the documented port"
    assert len({p for _, p in host_ports}) == len(host_ports), f"two replicas publish one host port: {host_ports}"


def test_compose_replicas_share_the_series_out() -> None:
    """anomalyd-0 .. anomalyd-(N-1): shard "I/N" through the real loader, each index once, N = the replicas; own
    state volumes, one models volume (the one demo-setup trains into), a stop grace period for the last tick."""
    svcs = services()
    reps = replicas()
    n = len(reps)
    assert n >= 2, "docker-compose.yml shows at least two replicas"
    models = {mounts(svcs["demo-setup"])["/var/lib/anomalyd/models"]}
    states = []
    for i, (name, svc) in enumerate(reps.items()):
        assert name == f"anomalyd-{i}", f"replica {i} is named {name}"
        cfg = config_with_env(env_of(svc))
        assert cfg.daemon.shard == (i, n), f"{name}: ANOMALYD_DAEMON_SHARD gives {cfg.daemon.shard}, not ({i}, {n})"
        m = mounts(svc)
        models.add(m[str(cfg.paths.models)])
        states.append(m[str(cfg.paths.state)])
        grace = re.fullmatch(r"(\d+)s", str(svc.get("stop_grace_period", "")))
        stop_timeout = int(unit_settings()["TimeoutStopSec"][0])
        assert grace and int(grace.group(1)) >= stop_timeout, f"{name}: stop_grace_period below {stop_timeout}s"
        assert svc["depends_on"]["demo-setup"]["condition"] == "service_completed_successfully"
    assert len(models) == 1, f"the replicas and demo-setup must share one models volume: {models}"
    assert len(set(states)) == n and not models & set(states), f"each replica needs its own state volume: {states}"
    # The other services name the replicas, not a service that no longer exists.
    for name, svc in svcs.items():
        assert "anomalyd" not in svc.get("depends_on", {}), f"{name} depends on the old service anomalyd"


def _anomalyd_argvs(svc: dict[str, Any]) -> list[list[str]]:
    cmd = svc.get("command")
    if svc.get("entrypoint") == ["/bin/sh", "-c"]:
        script = cmd[0] if isinstance(cmd, list) else cmd
        argvs = [shlex.split(part) for part in script.split("&&")]
        assert all(a[0] == "anomalyd" for a in argvs), script
        return [a[1:] for a in argvs]
    assert "entrypoint" not in svc, "only the /bin/sh -c form may replace the image's anomalyd entrypoint"
    return [list(cmd)]


def test_anomalyd_commands_parse_with_the_real_cli() -> None:
    parser = _parser()
    seen = {}
    for name, svc in anomalyd_services().items():
        for argv in _anomalyd_argvs(svc):
            args = parser.parse_args(argv)
            assert str(args.config) == IN_CONTAINER_CONFIG, f"{name}: {argv} does not use the mounted config"
            seen.setdefault(name, []).append(args)
    for name in replicas():
        run = seen[name][0]
        assert run.cmd == "run" and not run.once and not run.dry_run
    feed, train = seen["demo-setup"]
    assert (feed.cmd, feed.history, feed.follow, train.cmd) == ("feed", "7h", False, "train")
    live = seen["demo-feeder"][0]
    assert (live.cmd, live.follow, live.history) == ("feed", True, "0s")
    svcs = services()
    for name in replicas():
        assert svcs[name]["depends_on"]["demo-setup"]["condition"] == "service_completed_successfully"
        assert svcs[name]["depends_on"]["influxdb"]["condition"] == "service_healthy"
    assert svcs["demo-setup"]["restart"] == "no" and svcs["demo-setup"]["healthcheck"]["disable"] is True
    # The one-shot and feeder containers do not serve /healthz: the image's HEALTHCHECK must be off for them.
    for name in ("demo-setup", "demo-feeder", "kapacitor-tasks"):
        assert svcs[name]["healthcheck"]["disable"] is True, name


def test_tick_stack_wiring() -> None:
    svcs = services()
    db = CONFIG["influxdb"]["database"]
    influx = svcs["influxdb"]
    assert env_of(influx)["INFLUXDB_DB"] == db
    influx_port = int(urlsplit(CONFIG["influxdb"]["url"]).port or 8086)
    assert published(influx)[influx_port][1] == influx_port
    assert any("/ping" in str(part) for part in influx["healthcheck"]["test"])
    kap = env_of(svcs["kapacitor"])
    assert kap["KAPACITOR_INFLUXDB_0_URLS_0"] == f"http://influxdb:{influx_port}"
    assert kap["KAPACITOR_HOSTNAME"] == "kapacitor", "InfluxDB's subscription must reach Kapacitor by this name"
    chrono = svcs["chronograf"]
    cenv = env_of(chrono)
    assert cenv["INFLUXDB_URL"] == f"http://influxdb:{influx_port}"
    assert host_port(cenv["KAPACITOR_URL"]) == ("kapacitor", int(urlsplit(CONFIG["kapacitor"]["url"]).port or 9092))
    resources = mounts(chrono)[cenv["RESOURCES_PATH"]]
    assert list((ROOT / resources).glob("*.dashboard")), f"no *.dashboard in {resources}"


def test_grafana_provisioning_agrees_with_compose_and_config() -> None:
    svcs = services()
    graf = svcs["grafana"]
    m = mounts(graf)
    assert m["/etc/grafana/provisioning"] == "./grafana/provisioning"
    providers = []
    for path in sorted((ROOT / "grafana/provisioning/dashboards").glob("*.yaml")):
        providers += yaml.safe_load(path.read_text())["providers"]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    dash_dir = providers[0]["options"]["path"]
    assert dash_dir in m, f"the provider reads {dash_dir}, which is not mounted into the grafana container"
    dashboards = sorted((ROOT / m[dash_dir]).glob("*.json"))
    assert [p.name for p in dashboards] == ["anomalyd.json"]
    home = env_of(graf)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/anomalyd.json"
    sources = []
    for path in sorted((ROOT / "grafana/provisioning/datasources").glob("*.yaml")):
        sources += yaml.safe_load(path.read_text())["datasources"]
    (ds,) = sources
    assert ds["type"] == "influxdb" and ds["jsonData"]["version"] == "InfluxQL"
    host, port = host_port(ds["url"])
    assert host == "influxdb" and port == int(urlsplit(CONFIG["influxdb"]["url"]).port or 8086)
    assert ds["jsonData"]["dbName"] == ds["database"] == CONFIG["influxdb"]["database"]
    dashboard = json.loads(dashboards[0].read_text())
    refs = list(_datasource_refs(dashboard))
    assert refs and all(r == {"type": "influxdb", "uid": ds["uid"]} for r in refs if r.get("type") != "grafana")
    # Alerts link to the dashboard on the published Grafana port.
    link = urlsplit(CONFIG["alerts"]["dashboard_url"].split("?")[0])
    assert published(graf)[3000][1] == link.port and link.path == f"/d/{dashboard['uid']}/anomalyd"


def _datasource_refs(node: Any) -> Any:
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for v in node.values():
            yield from _datasource_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _datasource_refs(v)


def test_telegraf_example_scrapes_the_metrics_endpoint() -> None:
    conf_text = (ROOT / "telegraf" / "telegraf.conf").read_text()
    conf = tomllib.loads(conf_text)
    (prom,) = conf["inputs"]["prometheus"]
    (url,) = prom["urls"]
    var = re.fullmatch(r"\$\{(\w+):-(.+)\}", url)
    assert var, f"expected ${{VAR:-default}} in {url}"
    health_host, _, health_port = CONFIG["daemon"]["health_listen"].rpartition(":")
    # Standalone default: the daemon's default listen address.
    assert urlsplit(var.group(2)).netloc == f"{health_host}:{health_port}" and var.group(2).endswith("/metrics")
    (out,) = conf["outputs"]["influxdb"]
    ovar = re.fullmatch(r"\$\{(\w+):-(.+)\}", out["urls"][0])
    assert ovar and urlsplit(ovar.group(2)).port == urlsplit(CONFIG["influxdb"]["url"]).port
    # In compose, telegraf-compose.conf: the same file but for the URLs, which list every replica.
    tel = services()["telegraf"]
    assert tel.get("profiles") == ["telegraf"]
    assert mounts(tel)["/etc/telegraf/telegraf.conf"] == "./telegraf/telegraf-compose.conf"
    cconf = tomllib.loads((ROOT / "telegraf" / "telegraf-compose.conf").read_text())
    (cprom,) = cconf["inputs"]["prometheus"]
    assert sorted(cprom["urls"]) == [f"http://{name}:{health_port}/metrics" for name in replicas()], cprom["urls"]
    assert {k: v for k, v in cprom.items() if k != "urls"} == {k: v for k, v in prom.items() if k != "urls"}
    assert cconf["agent"] == conf["agent"] and cconf["outputs"]["influxdb"][0].keys() == out.keys()
    (cout,) = cconf["outputs"]["influxdb"]
    assert {k: v for k, v in cout.items() if k != "urls"} == {k: v for k, v in out.items() if k != "urls"}
    cvar = re.fullmatch(r"\$\{(\w+):-(.+)\}", cout["urls"][0])
    assert cvar, f"expected ${{VAR:-default}} in {cout['urls'][0]}"
    tenv = env_of(tel)
    for url in (cvar.group(2), tenv[cvar.group(1)]):
        assert host_port(url) == ("influxdb", urlsplit(CONFIG["influxdb"]["url"]).port), url
    for name in replicas():
        assert tel["depends_on"][name]["condition"] == "service_started"


# --------------------------------------------------------------------------------------------------------------
# daemon/Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers what is inside."""
    ignored = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if any(fnmatch(p, pat) for p in prefixes):
            ignored = not neg
    return ignored


def test_dockerfile_paths_exist_and_reach_the_build_context() -> None:
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copies = [rest for op, rest in ins if op == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for src in sources:
            assert not src.startswith("--"), f"unexpected COPY flag in {rest}"
            path = ROOT / src
            assert path.exists(), f"COPY {src}: no such file in the build context (the repository root)"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            kept = [p for p in files if not dockerignored(str(p.relative_to(ROOT)), patterns)]
            assert kept, f"COPY {src}: .dockerignore excludes all of it"
            if path.is_file():
                assert kept == [path], f"COPY {src}: excluded by .dockerignore"
            else:
                py = [p for p in files if p.suffix in (".py", ".tick")]  # the code and its TICKscripts
                assert all(p in kept for p in py), f"COPY {src}: .dockerignore drops some .py or .tick files"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "var/x"):
        assert dockerignored(heavy, patterns), f"{heavy} would be sent to the build context"
    assert any(op == "RUN" and "pip install" in rest for op, rest in ins), "the package is not pip-installed"


def test_the_image_installs_the_core_and_the_plots_extra_and_dev_gets_every_extra() -> None:
    """The daemon runs without the extras; the image adds the Slack plots, not what only evaluate needs."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = " ".join(meta["project"]["dependencies"])
    extras = meta["project"]["optional-dependencies"]
    assert "matplotlib" not in core and "stumpy" not in core
    assert extras["plots"] == ["matplotlib>=3.8"] and "matplotlib>=3.8" in extras["evaluate"]
    dev = [r for r in extras["dev"] if r.startswith("anomalyd[")]
    assert dev and {"plots", "evaluate", "dask"} <= set(dev[0][len("anomalyd["):-1].split(","))
    (install,) = [rest for op, rest in dockerfile_instructions() if op == "RUN" and "pip install" in rest]
    target = next(w for w in shlex.split(install) if w.startswith("/tmp/anomalyd-src"))
    assert target == "/tmp/anomalyd-src[plots]"


def test_dockerfile_runs_as_non_root_with_volumes_and_the_cli() -> None:
    ins = dockerfile_instructions()
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, f"the image runs as {users}"
    env = {}
    for op, rest in ins:
        if op == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
    vols = [json.loads(rest) for op, rest in ins if op == "VOLUME"]
    assert vols and env["ANOMALYD_PATHS_MODELS"] in vols[0] and env["ANOMALYD_PATHS_STATE"] in vols[0]
    cfg = config_with_env(env)
    assert str(cfg.paths.models) == env["ANOMALYD_PATHS_MODELS"] and str(cfg.paths.state) == env["ANOMALYD_PATHS_STATE"]
    port = int(env["ANOMALYD_DAEMON_HEALTH_LISTEN"].rpartition(":")[2])
    assert ("EXPOSE", str(port)) in ins
    # Compose sets the same values, so the image works the same with or without it.
    for name, svc in anomalyd_services().items():
        for key in ("ANOMALYD_PATHS_MODELS", "ANOMALYD_PATHS_STATE", "ANOMALYD_DAEMON_HEALTH_LISTEN"):
            assert env_of(svc)[key] == env[key], (name, key)
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    cmd = json.loads(next(rest for op, rest in ins if op == "CMD"))
    assert entry == ["anomalyd"]
    args = _parser().parse_args(cmd)
    assert args.cmd == "run" and str(args.config) == IN_CONTAINER_CONFIG
    assert ("COPY", f"config.toml {IN_CONTAINER_CONFIG}") in ins


def _healthcheck_argv() -> list[str]:
    rest = next(rest for op, rest in dockerfile_instructions() if op == "HEALTHCHECK")
    assert "--start-period=" in rest and "--interval=" in rest
    argv = json.loads(rest[rest.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2], argv
    return [sys.executable, *argv[1:]]


def test_dockerfile_healthcheck_asks_the_real_endpoint() -> None:
    """The HEALTHCHECK command, run as Docker would, against the daemon's own /healthz server."""
    argv = _healthcheck_argv()
    port = free_port()
    env = dict(os.environ, ANOMALYD_DAEMON_HEALTH_LISTEN=f"0.0.0.0:{port}")

    def check() -> int:
        return subprocess.run(argv, env=env, capture_output=True, timeout=20).returncode

    assert check() != 0, "the health check passes with nothing listening"
    health = Health(interval_s=0.01)
    server = serve_http(f"127.0.0.1:{port}", health)
    try:
        health.last_success, health.consecutive_failures = time.time(), 0
        assert check() == 0, "the health check fails although /healthz answers 200"
        health.last_success, health.consecutive_failures = None, 3
        health.started = time.time() - 3600
        assert check() != 0, "the health check passes although /healthz answers 503"
    finally:
        server.shutdown()


# --------------------------------------------------------------------------------------------------------------
# daemon/anomalyd.service
# --------------------------------------------------------------------------------------------------------------
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed; it is in Debian/Ubuntu's `systemd` package "
                    "(`apt-get install -y systemd`, as .ci/run and scripts/setup do)")
    return path


def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_declares_notify_watchdog_restart_user_state_and_hardening() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) > 2 * float(CONFIG["daemon"]["interval"].rstrip("s")), "watchdog too short"
    assert s["Restart"] == ["on-failure"]
    assert s.get("DynamicUser") == ["yes"] or s.get("User"), "needs DynamicUser= or a dedicated User="
    state_dirs = " ".join(s["StateDirectory"]).split()
    assert "anomalyd" in state_dirs
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "ProtectHome": "yes",
                       "PrivateDevices": "yes", "SystemCallFilter": "@system-service"}.items():
        assert value in s.get(key, []), f"{key}={value} missing"
    assert "AF_INET" in s["RestrictAddressFamilies"][0].split()
    # Models and state land in the StateDirectory (ProtectSystem=strict leaves nothing else writable), and the
    # ExecStart command is one the CLI accepts.
    env = dict(item.split("=", 1) for line in s["Environment"] for item in shlex.split(line))
    for key in ("ANOMALYD_PATHS_MODELS", "ANOMALYD_PATHS_STATE"):
        assert env[key].startswith("/var/lib/anomalyd/"), env[key]
        assert env[key].removeprefix("/var/lib/") in state_dirs, f"{env[key]} is not a StateDirectory"
    exec_argv = shlex.split(s["ExecStart"][0])
    assert exec_argv[0].endswith("/anomalyd")
    args = _parser().parse_args(exec_argv[1:])
    assert args.cmd == "run" and str(args.config).startswith("/etc/anomalyd/")
    assert "anomalyd" in s["ConfigurationDirectory"]


def test_train_unit_shares_the_daemon_identity_and_sandbox() -> None:
    daemon, train = unit_settings(UNIT), unit_settings(TRAIN_UNIT)
    assert train["Type"] == ["oneshot"]
    args = _parser().parse_args(shlex.split(train["ExecStart"][0])[1:])
    assert args.cmd == "train" and str(args.config) == str(_parser().parse_args(
        shlex.split(daemon["ExecStart"][0])[1:]).config)
    own = {"Type", "NotifyAccess", "ExecStart", "WatchdogSec", "TimeoutStartSec", "TimeoutStopSec", "Restart",
           "RestartSec", "Description", "WantedBy"}
    for key in (set(daemon) | set(train)) - own:
        assert daemon.get(key) == train.get(key), f"{key} differs: {daemon.get(key)} vs {train.get(key)}"


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """``verify`` refuses an ExecStart binary that does not exist, and /opt/anomalyd is not installed here: the
    test verifies copies whose ExecStart points at this checkout's ``anomalyd`` (the venv's console script);
    everything else is the shipped units, byte for byte. Any warning on stderr fails the test."""
    analyze = systemd_analyze()
    binary = Path(sys.executable).parent / "anomalyd"
    assert binary.exists(), f"{binary} is missing: install the package (pip install -e .)"
    copies = []
    for unit in (UNIT, TRAIN_UNIT):
        text = unit.read_text()
        exec_line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
        shipped_binary = shlex.split(exec_line.removeprefix("ExecStart="))[0]
        assert shipped_binary == "/opt/anomalyd/bin/anomalyd", "docs/deploy.md installs into /opt/anomalyd"
        copy = tmp_path / unit.name
        copy.write_text(text.replace(f"ExecStart={shipped_binary} ", f"ExecStart={binary} ", 1))
        assert copy.read_text() != text, "the ExecStart rewrite did not apply"
        copies.append(str(copy))
    r = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"systemd-analyze verify failed ({r.returncode}):\n{r.stderr}{r.stdout}"
    assert r.stderr.strip() == "", f"systemd-analyze verify warned:\n{r.stderr}"


def test_systemd_security_exposure(capsys: pytest.CaptureFixture[str]) -> None:
    analyze = systemd_analyze()
    r = subprocess.run([analyze, "security", "--offline=yes", str(UNIT)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"systemd-analyze security failed:\n{r.stderr}{r.stdout}"
    m = re.search(r"Overall exposure level for anomalyd\.service:\s*([\d.]+)\s*(\w+)", r.stdout)
    assert m, f"no exposure level in:\n{r.stdout}"
    score, verdict = float(m.group(1)), m.group(2)
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=yes daemon/anomalyd.service: exposure {score} {verdict}")
    assert score <= MAX_EXPOSURE, f"exposure {score} {verdict} is above {MAX_EXPOSURE}: the hardening regressed"
    assert f"{score} {verdict}" in DOCS.read_text(), f"docs/deploy.md does not quote the exposure {score} {verdict}"


class _Worker:
    def __init__(self, fail: int = 0) -> None:
        self.fail = fail

    def tick(self) -> TickReport:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("InfluxDB unreachable")
        return TickReport()


def _recv_all(sock: socket.socket, timeout: float = 0.2) -> list[str]:
    sock.settimeout(timeout)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except TimeoutError:
        return out


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_reaches_a_real_datagram_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"anomalyd-test-{os.getpid()}-{time.monotonic_ns()}"
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            sock.bind(str(tmp_path / "notify.sock"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        for msg in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
            assert sd_notify(msg) is True
        assert _recv_all(sock) == ["READY=1", "WATCHDOG=1", "STOPPING=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False


def test_ready_only_after_a_successful_tick_and_watchdog_from_every_tick(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        svc = Service(_Worker(fail=1), interval_s=0.01)  # type: ignore[arg-type]
        assert svc.run_tick() is None
        assert _recv_all(sock) == ["WATCHDOG=1"], "a failed tick must not report READY, but must keep the watchdog"
        time.sleep(0.05)
        assert svc.run_tick() is not None
        assert _recv_all(sock) == ["READY=1", "WATCHDOG=1"]
        assert svc.run_tick() is not None
        assert _recv_all(sock) == ["WATCHDOG=1"], "READY=1 is sent once"


def test_service_notifies_ready_watchdog_and_stopping_on_sigterm(tmp_path: Path) -> None:
    """The real loop in its own process, as systemd runs it: READY=1, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
    script = (
        "from anomalyd.service.daemon import Service\n"
        "from anomalyd.service.worker import TickReport\n"
        "class W:\n"
        "    def tick(self):\n"
        "        return TickReport()\n"
        "Service(W(), interval_s=0.2).run_forever()\n"
    )
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, NOTIFY_SOCKET=str(path)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            try:
                first = sock.recv(4096).decode()
                second = sock.recv(4096).decode()
                assert (first, second) == ("READY=1", "WATCHDOG=1")
                assert sock.recv(4096).decode() == "WATCHDOG=1", "no watchdog ping from the next tick"
                proc.send_signal(signal.SIGTERM)
                rest = []
                while "STOPPING=1" not in rest:
                    rest.append(sock.recv(4096).decode())
            except TimeoutError:
                proc.kill()
                out, _ = proc.communicate(timeout=20)
                pytest.fail(f"the service sent no (further) notification within 20 s; its output:\n{out.decode()}")
            out, _ = proc.communicate(timeout=20)
            assert proc.returncode == 0, out.decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
