"""The package layout's import rule: an import never runs from a pure room into an adapter.

Each sub-package of ``anomalyd`` may import only the rooms listed for it below (read from the source with `ast`,
including imports inside functions, so a lazy import counts too). The pure core imports no I/O library either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "anomalyd"

#: room -> the rooms it may import (besides itself). Top-level modules are rooms of their own.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "files": set(),
    "telemetry": set(),
    "config": {"core"},
    "store": {"core", "config", "telemetry"},
    "alerts": {"core", "config", "telemetry", "files"},
    "service": {"core", "config", "telemetry", "files", "store"},
    "evaluation": {"core", "config", "store", "service"},
    "demo": {"core", "config", "store", "service", "alerts"},
    "cli": {"core", "config", "store", "service", "alerts", "evaluation", "demo"},
    "__main__": {"cli"},
    "__init__": set(),
}
#: third-party libraries that do I/O or draw: never imported by the pure core.
IO_LIBRARIES = {"requests", "influxdb", "slack_sdk", "matplotlib", "apscheduler", "prometheus_client", "msgpack",
                "orjson", "urllib", "socket", "http", "subprocess", "tqdm", "joblib", "distributed"}


def _room(module: Path) -> str:
    rel = module.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(module: Path) -> list[tuple[str, int]]:
    """(absolute dotted name under anomalyd or a top-level library, line) of every import in ``module``."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    package = ["anomalyd", *module.relative_to(PKG).parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
                # `from . import x` names modules or packages: check each
                out += [(f"{name}.{a.name}" if not node.module else name, node.lineno) for a in node.names]
            else:
                out.append((node.module or "", node.lineno))
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_every_module_belongs_to_a_room() -> None:
    rooms = {_room(m) for m in MODULES}
    assert rooms <= set(ALLOWED), f"new room(s) {sorted(rooms - set(ALLOWED))}: add them to ALLOWED with their rule"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: str(m.relative_to(PKG)))
def test_imports_follow_the_layering(module: Path) -> None:
    room = _room(module)
    bad = []
    for name, line in _imports(module):
        parts = name.split(".")
        if parts[0] == "anomalyd" and len(parts) > 1:
            target = parts[1]
            if target == "__version__":  # the package's own version: every room may name it
                continue
            if target != room and target not in ALLOWED[room]:
                bad.append(f"line {line}: {name} ({room} may import {sorted(ALLOWED[room]) or 'no other room'})")
        elif room == "core" and parts[0] in IO_LIBRARIES:
            bad.append(f"line {line}: {name} (the core is pure: no I/O library)")
    assert not bad, f"{module.relative_to(PKG)}: " + "; ".join(bad)
