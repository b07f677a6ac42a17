"""A loopback stand-in for the Hugging Face Hub: enough of its HTTP API for ``create_repo`` + ``upload_folder``.

The demo pushes to it with the real huggingface_hub client (``push_to_hub(..., endpoint=hub.url)``), and the
tests use it to check exactly what arrives. It implements what huggingface_hub 2.4 sends for a push:

- ``POST /api/repos/create``                      -> ``{"url": ...}``; 409 when the repo exists
- ``POST /api/validate-yaml``                     -> the README's YAML header must parse to a mapping
- ``POST /api/models/{repo}/branch/{branch}``     -> creates a branch (409 when it exists)
- ``POST /api/models/{repo}/preupload/{rev}``     -> every file answered ``uploadMode: regular``, so the
  client sends the contents inline, base64, in the commit payload (no LFS / Xet storage needed)
- ``POST /api/models/{repo}/commit/{rev}``        -> NDJSON: a ``header`` line, then ``file`` lines

Every request is recorded (method, path, headers, body) before it is answered. Unknown routes answer 404 and
are recorded too. The server listens on 127.0.0.1 on a free port, in a daemon thread; ``stop()`` (or leaving
the ``with`` block) shuts it down with a bounded wait.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

_REPO_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit|branch)/(?P<rev>[^/]+)$")


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class LoopbackHub:
    def __init__(self, user: str = "tester", token: str | None = None, request_timeout: float = 10.0):
        """``token``: when set, requests whose ``Authorization`` is not ``Bearer <token>`` get a 401."""
        self.user = user
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.repos: dict[str, FakeRepo] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class(request_timeout))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    def download(self, repo_id: str, destination, revision: str = "main") -> Path:
        """Write the files of ``repo_id`` at ``revision`` into ``destination`` (a new folder)."""
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=False)
        for name, data in self.files(repo_id, revision).items():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return destination

    # ---------------------------------------------------------------- routes

    def _create_repo(self, body: dict) -> tuple[int, dict]:
        name, org = body.get("name"), body.get("organization")
        if not name or body.get("type", "model") != "model":
            return 400, {"error": f"fake hub: only model repos with a name, got {body}"}
        repo_id = f"{org or self.user}/{name}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = FakeRepo(repo_id, private=body.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()}

    def _validate_yaml(self, body: dict) -> tuple[int, dict]:
        content = body.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        if match is None:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "YAML metadata must be a mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, repo: FakeRepo, body: dict) -> tuple[int, dict]:
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in body.get("files", [])
        ]
        return 200, {"files": files, "commitOid": None}

    def _commit(self, repo: FakeRepo, rev: str, raw: bytes) -> tuple[int, dict]:
        if rev not in repo.branches:
            return 404, {"error": f"Invalid rev id: {rev}"}
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "commit payload must start with a header line"}
        staged: dict[str, bytes] = {}
        for line in lines[1:]:
            if line.get("key") != "file" or line["value"].get("encoding") != "base64":
                return 400, {"error": f"fake hub accepts only inline base64 files, got {line.get('key')!r}"}
            staged[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        repo.branches[rev].update(staged)
        oid = hashlib.sha1(raw).hexdigest()
        repo.commits.append({"revision": rev, "oid": oid, "summary": lines[0]["value"].get("summary"), "files": staged})
        return 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _branch(self, repo: FakeRepo, branch: str) -> tuple[int, dict]:
        if branch in repo.branches:
            return 409, {"error": "Reference already exists"}
        repo.branches[branch] = dict(repo.branches["main"])
        return 200, {}

    def _route(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict]:
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method != "POST":
            return 404, {"error": f"fake hub does not serve {method} {path}"}
        if path == "/api/repos/create":
            return self._create_repo(json.loads(raw))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(raw))
        match = _REPO_ROUTE.match(path)
        if match is None:
            return 404, {"error": f"fake hub does not serve {method} {path}"}
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        rev = unquote(match["rev"])
        if match["action"] == "preupload":
            return self._preupload(repo, json.loads(raw))
        if match["action"] == "commit":
            return self._commit(repo, rev, raw)
        return self._branch(repo, rev)

    def _handler_class(self, request_timeout: float):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = request_timeout  # a stuck client cannot hold a handler thread forever
            protocol_version = "HTTP/1.0"

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with hub._lock:
                    hub.requests.append(RecordedRequest(self.command, parts.path, parts.query, headers, raw))
                    try:
                        status, payload = hub._route(self.command, parts.path, headers, raw)
                    except (ValueError, KeyError) as exc:
                        status, payload = 400, {"error": f"fake hub could not parse the request: {exc!r}"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 404 and payload.get("error") == "Repository not found":
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

            def log_message(self, format, *args):  # keep test output quiet
                pass

        return Handler
