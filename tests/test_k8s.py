"""Kubernetes manifests (deploy/k8s): schema-valid, and in agreement with the config loader, the CLI, the image
and the compose file.

No cluster runs here, so every YAML document is validated against the Kubernetes OpenAPI schemas that the
``kubernetes-validate`` package ships (offline), in its strict mode: an unknown or misspelt field fails, as it
would with ``kubectl apply --validate=strict``. The rest is checked through the project's own code: the
ConfigMap's config.toml through ``anomalyd.config.from_dict`` with the pod's environment, the Secret's keys by
what the loader does with each, the StatefulSet's entrypoint by running it with ``/bin/sh`` (a fake ``anomalyd``
on PATH prints the shard it was given) for every pod ordinal, and the commands through the CLI's argument parser.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from anomalyd.cli import _parser
from anomalyd.config import Config, ConfigError, from_dict, parse_shard

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)
#: The oldest Kubernetes the manifests are written for (the pod-index label is beta, on by default, since 1.28),
#: and the newest whose schemas the installed kubernetes-validate ships.
K8S_VERSIONS = tuple(dict.fromkeys(("1.29", kubernetes_validate.latest_version())))
#: The label the StatefulSet controller puts on each pod (Kubernetes >= 1.28): the pod's ordinal.
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
DOCS = ROOT / "docs" / "deploy.md"


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} holds no YAML document"
    return docs


def objects() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in documents(path)]


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def statefulset() -> dict[str, Any]:
    return the("StatefulSet")


def cronjob() -> dict[str, Any]:
    return the("CronJob")


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod template in the manifests, by the name of its owner."""
    return {"StatefulSet": statefulset()["spec"]["template"]["spec"],
            "CronJob": cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]}


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["containers"]
    return dict(c)


def literal_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def dockerfile_env() -> dict[str, str]:
    """The image's ENV (daemon/Dockerfile): it overrides config.toml inside every container of the image."""
    text = re.sub(r"\\\n", " ", (ROOT / "daemon" / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        op, _, rest = line.strip().partition(" ")
        if op.upper() == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def dockerfile_user() -> tuple[int, int]:
    text = (ROOT / "daemon" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
    return int(user[0]), int(user[1])


def configmap_toml() -> tuple[str, dict[str, Any]]:
    """(the key, the parsed config.toml) of the ConfigMap the pods mount."""
    cm = the("ConfigMap")
    (key,) = cm["data"]
    assert key == "config.toml", f"the ConfigMap's key is {key}; the commands read config.toml"
    return key, tomllib.loads(cm["data"][key])


def secret_placeholders() -> dict[str, str]:
    (secret,) = documents(SECRET_EXAMPLE)
    return dict(secret["stringData"])


def pod_config(extra_env: dict[str, str] | None = None) -> Config:
    """The ConfigMap's config.toml as a replica loads it: the image's ENV, then the pod's literal env."""
    env = {**dockerfile_env(), **literal_env(container(pod_specs()["StatefulSet"])), **(extra_env or {})}
    return from_dict(configmap_toml()[1], source="deploy/k8s/configmap.yaml", env=env)


def resolve_port(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return int(found)


def probes(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}


def config_path(pod: dict[str, Any]) -> str:
    """Where the ConfigMap's config.toml is inside the container."""
    c = container(pod)
    vols = {v["name"]: v for v in pod["volumes"]}
    cm_name = the("ConfigMap")["metadata"]["name"]
    (mount,) = [m for m in c["volumeMounts"] if vols.get(m["name"], {}).get("configMap", {}).get("name") == cm_name]
    assert mount.get("readOnly") is True
    return f"{mount['mountPath']}/{configmap_toml()[0]}"


def entrypoint_script() -> str:
    c = container(pod_specs()["StatefulSet"])
    assert c["command"] == ["/bin/sh", "-c"], "the replicas start through a /bin/sh -c wrapper"
    (script,) = c["args"]
    return str(script)


def run_entrypoint(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The StatefulSet's entrypoint, run by a real /bin/sh with a fake ``anomalyd`` that prints its shard and argv."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.fail("no /bin/sh: the entrypoint test needs a POSIX shell (Debian's dash, as in python:3.11-slim)")
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "anomalyd"
    fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "SHARD=${ANOMALYD_DAEMON_SHARD-<unset>}"\n'
                    'for a in "$@"; do printf \'%s\\n\' "ARG=$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return subprocess.run([sh, "-c", entrypoint_script()], env={"PATH": f"{bindir}:/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=20)


# --------------------------------------------------------------------------------------------------------------
# Parsing and schema validation
# --------------------------------------------------------------------------------------------------------------
def test_every_manifest_parses_into_named_kubernetes_objects() -> None:
    assert [p.name for p in MANIFESTS] == sorted(
        ["namespace.yaml", "configmap.yaml", "models-pvc.yaml", "service.yaml", "statefulset.yaml",
         "cronjob-train.yaml", "secret.example.yaml"]), [p.name for p in MANIFESTS]
    seen = set()
    for path in MANIFESTS:
        for doc in documents(path):
            assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in seen, f"{path.name}: {key} is defined twice"
            seen.add(key)
    assert not list(K8S.glob("*.yml")), "use .yaml: the tests and kustomization.yaml only read *.yaml"


def _manifest_docs() -> Iterator[Any]:
    for path in MANIFESTS:
        for i, doc in enumerate(documents(path)):
            for version in K8S_VERSIONS:
                yield pytest.param(doc, version, id=f"{path.name}#{i}-k8s{version}")


@pytest.mark.parametrize(("doc", "version"), list(_manifest_docs()))
def test_manifest_is_valid_against_the_kubernetes_schema(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {where} (Kubernetes {version})")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(exc.message)


def test_strict_validation_rejects_what_a_cluster_would_reject() -> None:
    """The validation above can fail: an unknown field, a number where a string belongs, a missing field."""
    sts = statefulset()
    bad_field = copy.deepcopy(sts)
    bad_field["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # misspelt
    bad_type = copy.deepcopy(sts)
    bad_type["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = 2  # REPLICAS: 2, unquoted
    missing = copy.deepcopy(sts)
    del missing["spec"]["selector"]
    for doc in (bad_field, bad_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kust = documents(KUSTOMIZATION)[0]
    assert kust["kind"] == "Kustomization"
    listed = kust["resources"]
    assert sorted(listed) == sorted(p.name for p in MANIFESTS if p != SECRET_EXAMPLE), listed
    ns = the("Namespace")["metadata"]["name"]
    assert kust["namespace"] == ns
    # Applied with `kubectl apply -f` too, every namespaced object names the namespace itself.
    for doc in objects():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, f"{doc['kind']} {doc['metadata']['name']}"
    assert the("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------------------------------------------
# The ConfigMap, the Secret and the config loader
# --------------------------------------------------------------------------------------------------------------
def test_configmap_config_loads_without_problems() -> None:
    key, raw = configmap_toml()
    # As written (no environment) and as a replica sees it (the image's ENV and the pod's env on top).
    for seen_by in ("file", "pod"):
        try:
            cfg = from_dict(raw, source="configmap", env={}) if seen_by == "file" else pod_config()
        except ConfigError as exc:
            pytest.fail(f"deploy/k8s/configmap.yaml's {key} does not load ({seen_by}):\n{exc}")
        # The cluster adaptations: a Service name, not the loopback.
        for url in (cfg.influxdb.url, cfg.kapacitor.url):
            host = re.match(r"^https?://([^:/]+)", url)
            assert host and host.group(1) not in {"127.0.0.1", "localhost"}, url
            assert not re.fullmatch(r"[\d.]+", host.group(1)), f"{url}: name a Service, not an address"
        assert cfg.daemon.health_listen == "0.0.0.0:9108", "the probes reach the pod's IP, not its loopback"
        assert cfg.daemon.refit_every_s == 0, "refit in N replicas would retrain every model N times"
        assert cfg.daemon.shard is None, "the shard comes from the pod, never from the shared file"
        assert cfg.paths.models.is_absolute() and cfg.paths.state.is_absolute()
    # The file says what the image's ENV says (the environment would win over it, silently).
    img = dockerfile_env()
    assert raw["paths"] == {"models": img["ANOMALYD_PATHS_MODELS"], "state": img["ANOMALYD_PATHS_STATE"]}
    assert raw["daemon"]["health_listen"] == img["ANOMALYD_DAEMON_HEALTH_LISTEN"]


def test_secret_keys_are_the_variables_the_config_reads() -> None:
    """Each key of the Secret becomes an environment variable (envFrom): the real loader must read it as a
    credential. A misspelt key would be ignored or refused, and the credential lost."""
    _, raw = configmap_toml()
    placeholders = secret_placeholders()
    assert placeholders, "the example Secret has no keys"
    for key, value in placeholders.items():
        assert re.fullmatch(r"<[^<>]+>", value), f"{key}: the example holds placeholders only, e.g. <password>"
        cfg = from_dict(raw, env={key: value})
        read = {"influxdb.username": cfg.influxdb.username, "influxdb.password": cfg.influxdb.password,
                "influxdb.token": cfg.influxdb.token, "alerts.slack.webhook_url": cfg.alerts.slack.webhook_url,
                "alerts.slack.token": cfg.alerts.slack.token}
        assert value in read.values(), f"{key} is not a variable config.py reads a secret from: {read}"
    with pytest.raises(ConfigError):  # and a misspelt one is refused, not ignored: the check above can fail
        from_dict(raw, env={"ANOMALYD_INFLUXDB_PASSWD": "<x>"})
    (secret,) = documents(SECRET_EXAMPLE)
    name = secret["metadata"]["name"]
    for owner, pod in pod_specs().items():
        refs = [e["secretRef"]["name"] for e in container(pod).get("envFrom", []) if "secretRef" in e]
        assert refs == [name], f"{owner} does not take its credentials from the Secret {name}"
    kust = documents(KUSTOMIZATION)[0]
    assert SECRET_EXAMPLE.name not in kust["resources"], "applying the placeholders would overwrite the real Secret"
    assert "kubectl" in SECRET_EXAMPLE.read_text() and "create secret generic" in SECRET_EXAMPLE.read_text()


# --------------------------------------------------------------------------------------------------------------
# The StatefulSet: shard from the pod ordinal, probes, volumes, security
# --------------------------------------------------------------------------------------------------------------
def test_replicas_and_the_shard_count_agree() -> None:
    sts = statefulset()
    c = container(pod_specs()["StatefulSet"])
    replicas = sts["spec"]["replicas"]
    assert replicas >= 2, "the example shows sharded replicas"
    assert literal_env(c)["REPLICAS"] == str(replicas), "REPLICAS must equal spec.replicas: change both together"
    (pod_index,) = [e for e in c["env"] if e["name"] == "POD_INDEX"]
    assert pod_index["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{POD_INDEX_LABEL}']"
    assert "ANOMALYD_DAEMON_SHARD" not in literal_env(c), "a literal shard would be the same in every pod"


def test_entrypoint_gives_every_ordinal_its_shard(tmp_path: Path) -> None:
    """For every pod ordinal, from the pod-index label and (older clusters, label missing) from the hostname: the
    wrapper exports "I/N", which the real loader reads as (I, N), and runs `anomalyd run` on the mounted config."""
    sts = statefulset()
    n = sts["spec"]["replicas"]
    name = sts["metadata"]["name"]
    replicas = literal_env(container(pod_specs()["StatefulSet"]))["REPLICAS"]
    parser = _parser()
    for i in range(n):
        for env in ({"POD_INDEX": str(i), "HOSTNAME": f"{name}-{i}"}, {"POD_INDEX": "", "HOSTNAME": f"{name}-{i}"}):
            r = run_entrypoint(tmp_path, {**env, "REPLICAS": replicas})
            assert r.returncode == 0, f"{env}: exit {r.returncode}\n{r.stderr}"
            lines = r.stdout.splitlines()
            shard = lines[0].removeprefix("SHARD=")
            assert parse_shard(shard) == (i, n), f"pod {i} ({env}) gets daemon.shard {shard!r}"
            assert pod_config({"ANOMALYD_DAEMON_SHARD": shard}).daemon.shard == (i, n)
            args = parser.parse_args([ln.removeprefix("ARG=") for ln in lines[1:]])
            assert args.cmd == "run" and not args.once and not args.dry_run
            assert str(args.config) == config_path(pod_specs()["StatefulSet"])
    # Without REPLICAS the wrapper refuses to start the daemon.
    r = run_entrypoint(tmp_path, {"POD_INDEX": "0", "HOSTNAME": f"{name}-0"})
    assert r.returncode != 0 and "SHARD=" not in r.stdout, r.stdout
    # Scaled up without REPLICAS: the new pod's "N/N" is a config error, so it never scores anyone's series.
    r = run_entrypoint(tmp_path, {"POD_INDEX": str(n), "HOSTNAME": f"{name}-{n}", "REPLICAS": replicas})
    shard = r.stdout.splitlines()[0].removeprefix("SHARD=")
    assert shard == f"{n}/{n}"
    with pytest.raises(ConfigError, match="ANOMALYD_DAEMON_SHARD"):
        pod_config({"ANOMALYD_DAEMON_SHARD": shard})


def test_entrypoint_execs_the_daemon_so_it_gets_sigterm() -> None:
    lines = [ln.strip() for ln in entrypoint_script().strip().splitlines()]
    assert lines[-1].startswith("exec anomalyd run "), "without exec, sh would get SIGTERM and the daemon a SIGKILL"
    assert lines[0] == "set -eu"


def test_probes_ask_healthz_on_the_configured_port() -> None:
    pod = pod_specs()["StatefulSet"]
    c = container(pod)
    cfg = pod_config()
    health_port = int(cfg.daemon.health_listen.rpartition(":")[2])
    assert int(configmap_toml()[1]["daemon"]["health_listen"].rpartition(":")[2]) == health_port
    found = probes(c)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in found.items():
        assert probe["httpGet"]["path"] == "/healthz", kind
        assert resolve_port(c, probe["httpGet"]["port"]) == health_port, f"{kind} asks another port"
    # Readiness: out within half a minute of 503. Liveness: generous, at least the systemd unit's watchdog (a hung
    # loop), and long past what the daemon's own backoff covers. Startup: time for the first catch-up tick.
    ready, live, start = found["readinessProbe"], found["livenessProbe"], found["startupProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 60
    unit = (ROOT / "daemon" / "anomalyd.service").read_text()
    watchdog = int(re.search(r"^WatchdogSec=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert live["periodSeconds"] * live["failureThreshold"] >= watchdog
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    # Prometheus scrapes the same port, /metrics, through the pod annotations; the Service lists it.
    ann = statefulset()["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == health_port
    svc = the("Service")
    (port,) = svc["spec"]["ports"]
    assert port["port"] == health_port and resolve_port(c, port["targetPort"]) == health_port


def test_headless_service_selects_the_replicas_only() -> None:
    svc, sts = the("Service"), statefulset()
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    train_labels = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= train_labels.items(), "the train job's pods would become endpoints"
    assert not sts["spec"]["selector"]["matchLabels"].items() <= train_labels.items()


def test_state_per_replica_models_shared_and_read_only() -> None:
    cfg = pod_config()
    sts = statefulset()
    pod = pod_specs()["StatefulSet"]
    c = container(pod)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    for m in c["volumeMounts"]:
        assert m["name"] in vols or m["name"] in claims, f"mount {m['name']} has no volume"
    state = mounts[str(cfg.paths.state)]
    assert state["name"] in claims and not state.get("readOnly"), "state: a claim of each replica's own, writable"
    assert claims[state["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    models = mounts[str(cfg.paths.models)]
    assert models.get("readOnly") is True, "the replicas only read the models (refit is off)"
    pvc = the("PersistentVolumeClaim")
    assert vols[models["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes share the models"
    # The train job writes into that same claim, at the path its config names.
    tpod = pod_specs()["CronJob"]
    tc = container(tpod)
    tvols = {v["name"]: v for v in tpod["volumes"]}
    tmount = next(m for m in tc["volumeMounts"] if m["mountPath"] == str(cfg.paths.models))
    assert not tmount.get("readOnly") and tvols[tmount["name"]]["persistentVolumeClaim"]["claimName"] == \
        pvc["metadata"]["name"]
    # The root filesystem is read-only: matplotlib's cache directory must be on a writable emptyDir.
    mpl = dockerfile_env()["MPLCONFIGDIR"]
    for owner, p in pod_specs().items():
        pvols = {v["name"]: v for v in p["volumes"]}
        writable = [m["mountPath"] for m in container(p)["volumeMounts"]
                    if "emptyDir" in pvols.get(m["name"], {}) and not m.get("readOnly")]
        assert any(mpl.startswith(w.rstrip("/") + "/") for w in writable), f"{owner}: {mpl} is not writable"


def test_pods_run_as_the_image_user_without_privileges() -> None:
    """The "restricted" Pod Security Standard, and the image's uid/gid (the claims are chowned to its fsGroup)."""
    uid, gid = dockerfile_user()
    for owner, pod in pod_specs().items():
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == uid and psc["runAsGroup"] == gid, owner
        assert psc["fsGroup"] == gid and psc["seccompProfile"]["type"] == "RuntimeDefault", owner
        assert pod["automountServiceAccountToken"] is False, owner
        c = container(pod)
        csc = c["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False, owner
        assert csc["capabilities"] == {"drop": ["ALL"]}, owner
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][bound].keys(), f"{owner}: resources.{bound}"


def test_termination_grace_covers_the_last_tick() -> None:
    grace = pod_specs()["StatefulSet"]["terminationGracePeriodSeconds"]
    unit = (ROOT / "daemon" / "anomalyd.service").read_text()
    stop_timeout = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert grace >= stop_timeout, "the daemon gets at least the systemd unit's time to finish its tick"
    assert grace >= 2 * pod_config().daemon.interval_s


def test_images_match_the_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    built = {svc["image"] for svc in compose["services"].values() if "build" in svc}
    assert len(built) == 1, built
    for owner, pod in pod_specs().items():
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["image"] == next(iter(built)), f"{owner}: {c['image']} is not the compose file's {built}"
            assert c["imagePullPolicy"] == "IfNotPresent"


def test_train_cronjob_runs_anomalyd_train() -> None:
    cj = cronjob()
    assert cj["spec"]["concurrencyPolicy"] == "Forbid", "two trainings would write the same model files"
    pod = pod_specs()["CronJob"]
    c = container(pod)
    assert "command" not in c, "the image's ENTRYPOINT (anomalyd) runs the args"
    entry = re.search(r'^ENTRYPOINT\s+(\[.*\])$', (ROOT / "daemon" / "Dockerfile").read_text(), re.M)
    assert entry and json.loads(entry.group(1)) == ["anomalyd"]
    args = _parser().parse_args(c["args"])
    assert args.cmd == "train" and str(args.config) == config_path(pod)
    assert str(args.config) == config_path(pod_specs()["StatefulSet"])
    assert pod["restartPolicy"] in {"Never", "OnFailure"}


def test_docs_explain_apply_and_scaling() -> None:
    text = DOCS.read_text()
    section = text[text.index("## Kubernetes"):]
    for needle in ("kubectl apply -k deploy/k8s", "REPLICAS", "create secret generic", "anomalyd-train",
                   POD_INDEX_LABEL, "ReadWriteMany", "kubectl scale"):
        assert needle in section, f"docs/deploy.md's Kubernetes section does not mention {needle}"
    assert os.path.basename(SECRET_EXAMPLE) in section
