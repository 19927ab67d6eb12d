"""Recording local HTTP stand-ins for Slack and Kapacitor, for tests.

Each stub is a ``ThreadingHTTPServer`` on ``127.0.0.1`` (port 0) in a thread. It records every request
(method, path, query, headers, body parsed as JSON or form) and answers from a per-test script of
:class:`Reply` objects, falling back to a realistic default answer.

- :class:`SlackStub`: an incoming webhook at :attr:`SlackStub.webhook_url` and the Web API under
  :attr:`SlackStub.api_url` (``chat.postMessage``, ``files.getUploadURLExternal``, the upload URL it hands
  out, ``files.completeUploadExternal``). Script replies with :meth:`StubServer.script`: ``Reply.ok()``,
  ``Reply.rate_limited(retry_after)``, ``Reply.error(500)``, ``Reply.hang(seconds)``.
- :class:`KapacitorStub`: ``/kapacitor/v1/tasks`` answering like the real API (200 with the task JSON, 400
  ``{"error": "invalid TICKscript: ..."}``, 404 for an unknown task), with its own check of the vars
  against the script's declarations.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    """One request as the stub received it, and the status it answered (None: it hung up)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    json: Any = None
    form: dict[str, list[str]] | None = None
    at: float = 0.0
    status: int | None = None
    reply: Any = None


@dataclass
class Reply:
    """A scripted answer. ``hang_s`` > 0: wait that long, then drop the connection without answering."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang_s: float = 0.0
    path: str | None = None  # only for requests whose path starts with this

    @classmethod
    def ok(cls, body: Any = None, path: str | None = None) -> Reply:
        return cls(200, body, path=path)

    @classmethod
    def rate_limited(cls, retry_after: float, path: str | None = None) -> Reply:
        return cls(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": f"{retry_after:g}"}, path=path)

    @classmethod
    def error(cls, status: int = 500, body: Any = None, path: str | None = None) -> Reply:
        return cls(status, body if body is not None else b"internal_error", path=path)

    @classmethod
    def hang(cls, seconds: float, path: str | None = None) -> Reply:
        return cls(0, hang_s=seconds, path=path)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        rec = Recorded(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()), body,
                       at=time.monotonic())
        ctype = self.headers.get("Content-Type", "")
        if body and "json" in ctype:
            try:
                rec.json = json.loads(body)
            except ValueError:
                pass
        elif body and "x-www-form-urlencoded" in ctype:
            try:
                rec.form = parse_qs(body.decode(), strict_parsing=True)
            except (UnicodeDecodeError, ValueError):
                pass  # raw bytes (a file upload)
        reply = stub._next_reply(rec)
        if reply.hang_s > 0:
            stub._record(rec)
            stub._stopping.wait(reply.hang_s)
            self.close_connection = True
            return
        rec.status, rec.reply = reply.status, reply.body
        stub._record(rec)
        data = reply.body
        ctype_out = "text/plain"
        if isinstance(data, dict | list):
            data, ctype_out = json.dumps(data).encode(), "application/json; charset=utf-8"
        elif isinstance(data, str):
            data = data.encode()
        elif data is None:
            data = b""
        self.send_response(reply.status)
        if reply.status != 204:
            self.send_header("Content-Type", ctype_out)
            self.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if reply.status != 204:
            self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: StubServer


class StubServer:
    """A recording HTTP server answering scripted replies first, then :meth:`default_reply`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=type(self).__name__, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *replies: Reply) -> None:
        """Answer the next matching requests with ``replies``, in order."""
        with self._lock:
            self._script.extend(replies)

    def clear_script(self) -> None:
        with self._lock:
            self._script.clear()

    def _next_reply(self, rec: Recorded) -> Reply:
        with self._lock:
            for i, r in enumerate(self._script):
                if r.path is None or rec.path.startswith(r.path):
                    del self._script[i]
                    return r
        return self.default_reply(rec)

    def default_reply(self, rec: Recorded) -> Reply:
        return Reply.ok(b"ok")

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def recorded(self, path_prefix: str = "") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]


class SlackStub(StubServer):
    """Slack: an incoming webhook and the Web API methods anomalyd uses."""

    WEBHOOK_PATH = "/services/T000/B000/s3cr3tWebhookPath"

    def __init__(self) -> None:
        super().__init__()
        #: While set, every webhook and Web API request gets this reply (an outage); None: Slack is up.
        self.outage: Reply | None = None

    @property
    def webhook_url(self) -> str:
        return self.url + self.WEBHOOK_PATH

    @property
    def api_url(self) -> str:
        """Pass as ``WebClient(base_url=...)`` / ``alerts.slack.base_url``."""
        return self.url + "/api/"

    def default_reply(self, rec: Recorded) -> Reply:
        outage = self.outage
        if outage is not None:
            return outage
        if rec.path == self.WEBHOOK_PATH:
            return Reply.ok("ok")
        if rec.path == "/api/chat.postMessage":
            n = len(self.recorded("/api/chat.postMessage"))
            return Reply.ok({"ok": True, "channel": "C0ALERTS", "ts": f"1700000000.{n:06d}",
                             "message": {"text": (rec.json or {}).get("text", "")}})
        if rec.path == "/api/files.getUploadURLExternal":
            n = len(self.recorded("/api/files.getUploadURLExternal"))
            return Reply.ok({"ok": True, "upload_url": f"{self.url}/upload/F{n:04d}", "file_id": f"F{n:04d}"})
        if rec.path.startswith("/upload/"):
            return Reply.ok("OK - 1234")
        if rec.path == "/api/files.completeUploadExternal":
            files = json.loads(((rec.form or {}).get("files") or rec.query.get("files") or ["[]"])[0])
            return Reply.ok({"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]})
        return Reply(404, {"ok": False, "error": "unknown_method"})

    def delivered(self) -> list[dict[str, Any]]:
        """The message payloads Slack accepted: webhook posts answered 200 and chat.postMessage calls answered
        ``{"ok": true}``."""
        return [r.json for r in self.requests if r.status == 200 and (
            r.path == self.WEBHOOK_PATH
            or (r.path == "/api/chat.postMessage" and isinstance(r.reply, dict) and r.reply.get("ok")))]


# ---------------------------------------------------------------------------------------------------------
# Kapacitor

_VAR_TYPES = {"bool", "int", "float", "duration", "string", "regex", "lambda", "star", "list"}
_ID_RE = re.compile(r"^[-._\w]+$")


def _declared(script: str) -> dict[str, str | None]:
    """var name -> type (None when not inferable), as Kapacitor's evaluator sees the declarations."""
    out: dict[str, str | None] = {}
    for line in script.splitlines():
        line = line.strip()
        m = re.match(r"var\s+(\w+)\s+(\w+)$", line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = re.match(r"var\s+(\w+)\s*=\s*(.+)$", line)
        if not m:
            continue
        v = m.group(2)
        typ: str | None = None
        if v[0] == "'":
            typ = "string"
        elif v.startswith("lambda:"):
            typ = "lambda"
        elif v[0] == "[":
            typ = "list"
        elif v in ("TRUE", "FALSE"):
            typ = "bool"
        elif re.fullmatch(r"\d+(u|µ|ms|s|m|h|d|w)", v):
            typ = "duration"
        elif re.fullmatch(r"\d+\.\d*", v):
            typ = "float"
        elif re.fullmatch(r"\d+", v):
            typ = "int"
        out[m.group(1)] = typ
    return out


def _required(script: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"(?m)^\s*var\s+(\w+)\s+\w+\s*$", script)}


class KapacitorStub(StubServer):
    """Kapacitor's task API, in memory.

    ``compile_errors[task_id] = "line 3 char 9: ..."`` makes the next create/update of that task fail the way
    a TICKscript compile error does. ``status_changes`` lists (task id, status) in the order they were set.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, dict[str, Any]] = {}
        self.compile_errors: dict[str, str] = {}
        self.status_changes: list[tuple[str, str]] = []

    @staticmethod
    def _err(status: int, msg: str) -> Reply:
        return Reply(status, {"error": msg})

    def _check(self, task: dict[str, Any]) -> str | None:
        script = task.get("script") or ""
        if not script:
            return "must provide TICKscript"
        if task.get("type") not in ("stream", "batch"):
            return f"invalid task type: {task.get('type')}"
        if not task.get("dbrps") or not all(isinstance(d, dict) and d.get("db") and d.get("rp")
                                           for d in task["dbrps"]):
            return "must specify dbrp"
        declared = _declared(script)
        variables = task.get("vars") or {}
        for name, var in variables.items():
            if var.get("type") not in _VAR_TYPES:
                return f"invalid var {name}: invalid var type {var.get('type')!r}"
            if var["type"] == "list" and not all(v.get("type") in ("string", "star") for v in var["value"]):
                return f"invalid var {name}: lists may only contain string or star vars"
            if var["type"] == "float" and not isinstance(var["value"], int | float):
                return f"invalid var {name}: float value must be a number"
            want = declared.get(name)
            if name in declared and want is not None and want != var["type"]:
                return f"invalid TICKscript: invalid type supplied for {name}, got {var['type']} exp {want}"
        for name in _required(script):
            if name not in variables:
                return f'invalid TICKscript: missing value for var "{name}".'
        if task.get("id") in self.compile_errors:
            return "invalid TICKscript: " + self.compile_errors.pop(task["id"])
        return None

    def _view(self, task: dict[str, Any]) -> dict[str, Any]:
        return {"link": {"rel": "self", "href": f"/kapacitor/v1/tasks/{task['id']}"}, **task,
                "dot": f"digraph {task['id']} {{}}", "executing": task["status"] == "enabled", "error": "",
                "stats": {}}

    def default_reply(self, rec: Recorded) -> Reply:
        base = "/kapacitor/v1/tasks"
        now = datetime.now(UTC).isoformat()
        if rec.path == "/kapacitor/v1/ping":
            return Reply(204)
        if rec.method == "POST" and rec.path == base:
            body = rec.json if isinstance(rec.json, dict) else None
            if body is None:
                return self._err(400, "invalid JSON")
            tid = body.get("id", "")
            if not _ID_RE.match(tid):
                return self._err(400, "task ID must contain only letters, numbers, '-', '.' and '_'. "
                                      f"{tid!r}")
            if tid in self.tasks:
                return self._err(400, f"task {tid} already exists")
            status = str(body["status"]) if body.get("status") in ("enabled", "disabled") else "disabled"
            new = {"id": tid, "template-id": "", "type": body.get("type"), "dbrps": body.get("dbrps") or [],
                   "script": body.get("script", ""), "vars": body.get("vars") or {}, "status": status,
                   "created": now, "modified": now}
            problem = self._check(new)
            if problem:
                return self._err(400, problem)
            self.tasks[tid] = new
            self.status_changes.append((tid, status))
            return Reply(200, self._view(new))
        if rec.path.startswith(base + "/"):
            tid = rec.path[len(base) + 1:]
            task = self.tasks.get(tid)
            if rec.method == "GET":
                return Reply(200, self._view(task)) if task else self._err(404, "no task exists")
            if rec.method == "DELETE":
                self.tasks.pop(tid, None)
                return Reply(204)
            if rec.method == "PATCH":
                if task is None:
                    return self._err(404, "task does not exist, cannot update")
                body = rec.json if isinstance(rec.json, dict) else None
                if body is None:
                    return self._err(400, "invalid JSON")
                updated = dict(task)
                for k in ("type", "script", "dbrps"):
                    if body.get(k):
                        updated[k] = body[k]
                if body.get("vars"):
                    updated["vars"] = body["vars"]
                if body.get("status") in ("enabled", "disabled"):
                    updated["status"] = body["status"]
                problem = self._check(updated)
                if problem:
                    return self._err(400, problem)
                updated["modified"] = now
                if updated["status"] != task["status"]:
                    self.status_changes.append((tid, updated["status"]))
                self.tasks[tid] = updated
                return Reply(200, self._view(updated))
        return self._err(404, "not found")

    def calls(self) -> Iterator[tuple[str, str]]:
        """(method, path) of every request, in order."""
        for r in self.recorded():
            yield r.method, r.path
