"""Loopback fake of the Hugging Face Hub's write API, reached through the real huggingface_hub client.

Point the client at it with HF_ENDPOINT=<fake.url> and HF_HUB_DISABLE_XET=1: the real Hub also
serves Xet storage (hf_xet's CAS protocol), which this fake does not speak, so the client must
take its git-LFS path; everything else is the same code path as against huggingface.co.

Routes are the ones huggingface_hub 2.4.0 calls for HfApi.create_repo, create_commit and
upload_folder (read from huggingface_hub/hf_api.py, _commit_api.py, lfs.py in the venv):
- POST /api/repos/create {name, organization, visibility}    -> 200 {"url", "name", "id"}
- GET  /api/models/{ns}/{name}[/revision/{rev}]              -> repo info (create_repo(exist_ok)
  calls it after a 401/403 to see whether the repo exists anyway)
- POST /api/validate-yaml {content, repoType}               -> README.md metadata check
- POST /api/models/{ns}/{name}/preupload/{rev} {files}      -> uploadMode "lfs" | "regular" per file
- POST /{ns}/{name}.git/info/lfs/objects/batch (git-lfs batch API, "basic" transfer)
- PUT  /_lfs/{oid} (the upload href: the body's sha256 and size must match)   POST /_lfs/verify/{oid}
- POST /api/models/{ns}/{name}/commit/{rev} (ndjson: header, file, lfsFile, deletedFile lines)

Strictness (the real Hub's documented behaviour; the harsher reading where unclear):
- Every call needs `Authorization: Bearer <token>`. Unknown token: 401 {"error": "Invalid
  credentials in Authorization header"}. A token may write only its own namespace and the orgs
  given to it: creating elsewhere is 403 "You don't have the rights to create a model under the
  namespace" (hf_api.create_repo: "403 -> if no write permission on the namespace"); writing to a
  repo you cannot write is 403. A repo that already exists is 409 (create_repo's exist_ok path).
- A repo that does not exist, or someone else's private repo, is 404 with X-Error-Code:
  RepoNotFound (utils/_http.py hf_raise_for_status maps it to RepositoryNotFoundError).
- preupload: files over 10 MB, binary files and the default .gitattributes LFS patterns
  (*.safetensors, *.bin, *.gguf, *.pt, ...) are "lfs" (Hub docs: files over 10 MB need LFS/Xet).
- commit: a "regular" (base64 inline) file that is binary or over 10 MB is rejected (400); an
  lfsFile whose object was never uploaded is rejected (422); a header line must come first.
- Failure injection: `commit_delay_s` (the Hub takes seconds to accept a big commit) and
  `fail_commits` (the next n commits answer 500, as a Hub outage does).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

TEN_MB = 10 * 1024 * 1024
LFS_PATTERNS = re.compile(r".*\.(safetensors|bin|gguf|pt|pth|ckpt|h5|msgpack|onnx|pkl|npy|npz|zip|tar\.gz|tgz)$")
REPO = r"(?P<ns>[A-Za-z0-9][\w.-]*)/(?P<name>[\w.-]+)"


@dataclass
class Account:
    user: str
    orgs: tuple[str, ...] = ()
    write: bool = True  # a "read" token can read but not create or commit

    def can_write(self, namespace: str) -> bool:
        return self.write and namespace in (self.user, *self.orgs)


@dataclass
class Repo:
    owner_ns: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)  # path -> content (LFS resolved)
    commits: list[str] = field(default_factory=list)


class FakeHub:
    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid -> uploaded content
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.commit_delay_s = 0.0
        self.fail_commits = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- setup ---------------------------------------------------------------
    def add_token(self, token: str, user: str, *, orgs: tuple[str, ...] = (), write: bool = True) -> None:
        self.accounts[token] = Account(user, orgs, write)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1"}

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[FakeHub]:
        hub = cls()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        server.daemon_threads = True
        hub._server = server
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield hub
        finally:
            server.shutdown()
            server.server_close()

    # -- request handling (returns status, headers, body) ----------------------
    def handle(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            self.requests.append((method, path))
        if method == "PUT" and path.startswith("/_lfs/"):  # a pre-signed storage URL: no token
            return self._lfs_put(path.removeprefix("/_lfs/"), query, body)
        account = self.accounts.get(headers.get("authorization", "").removeprefix("Bearer ").strip())
        if account is None:
            return 401, {}, {"error": "Invalid credentials in Authorization header"}
        if method == "POST" and path.startswith("/_lfs/verify/"):
            oid = path.removeprefix("/_lfs/verify/")
            return (200, {}, {"success": True}) if oid in self.lfs else (404, {}, {"error": "Object not found"})
        if method == "POST" and path == "/api/repos/create":
            return self._create(account, json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {}, {"errors": [], "warnings": []}
        if m := re.fullmatch(rf"/api/models/{REPO}(/revision/[^/]+)?", path):
            return self._info(account, m["ns"], m["name"]) if method == "GET" else (405, {}, {})
        if method == "POST" and (m := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path)):
            return self._preupload(account, m["ns"], m["name"], json.loads(body))
        if method == "POST" and (m := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path)):
            return self._lfs_batch(account, m["ns"], m["name"], json.loads(body))
        if method == "POST" and (m := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path)):
            return self._commit(account, m["ns"], m["name"], unquote(m["rev"]), body)
        return 404, {}, {"error": f"fake hub has no route {method} {path}"}

    def _repo_for(self, account: Account, ns: str, name: str, *, write: bool) -> tuple[Repo | None, tuple | None]:
        repo = self.repos.get(f"{ns}/{name}")
        if repo is None or (repo.private and ns not in (account.user, *account.orgs)):
            return None, (404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"})
        if write and not account.can_write(ns):
            return None, (403, {}, {"error": f"You don't have the rights to write to {ns}/{name}"})
        return repo, None

    def _create(self, account: Account, payload: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        name, ns = payload.get("name"), payload.get("organization") or account.user
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]{1,96}", name):
            return 400, {}, {"error": "Invalid repo name"}
        if not account.can_write(ns):
            return 403, {}, {"error": f'You don\'t have the rights to create a model under the namespace "{ns}"'}
        repo_id = f"{ns}/{name}"
        with self.lock:
            if repo_id in self.repos:
                return 409, {}, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
            self.repos[repo_id] = Repo(owner_ns=ns, private=private)
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _info(self, account: Account, ns: str, name: str) -> tuple[int, dict[str, str], Any]:
        repo, err = self._repo_for(account, ns, name, write=False)
        if err:
            return err
        assert repo is not None
        sha = hashlib.sha1(str(repo.commits).encode()).hexdigest()
        return 200, {}, {"id": f"{ns}/{name}", "private": repo.private, "sha": sha,
                         "siblings": [{"rfilename": p} for p in sorted(repo.files)]}

    def _preupload(self, account: Account, ns: str, name: str, payload: dict[str, Any]) -> tuple[int, dict, Any]:
        _, err = self._repo_for(account, ns, name, write=True)
        if err:
            return err
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f["sample"])
            lfs = f["size"] > TEN_MB or b"\x00" in sample or bool(LFS_PATTERNS.match(f["path"]))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {}, {"files": files, "commitOid": None}

    def _lfs_batch(self, account: Account, ns: str, name: str, payload: dict[str, Any]) -> tuple[int, dict, Any]:
        _, err = self._repo_for(account, ns, name, write=True)
        if err:
            return err
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            return 422, {}, {"message": "only the basic upload transfer is supported"}
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs:  # already stored: no actions, the client skips the upload
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{oid}?size={size}"},
                                    "verify": {"href": f"{self.url}/_lfs/verify/{oid}"}}
            objects.append(entry)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def _lfs_put(self, oid: str, query: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        size = int(query.removeprefix("size=") or -1)
        if hashlib.sha256(body).hexdigest() != oid or len(body) != size:
            return 400, {}, {"error": "content does not match the announced sha256/size"}
        with self.lock:
            self.lfs[oid] = body
        return 200, {}, {}

    def _commit(self, account: Account, ns: str, name: str, rev: str, body: bytes) -> tuple[int, dict, Any]:
        repo, err = self._repo_for(account, ns, name, write=True)
        if err:
            return err
        assert repo is not None
        if rev != "main":
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {rev}"}
        if self.commit_delay_s:
            time.sleep(self.commit_delay_s)
        with self.lock:
            if self.fail_commits > 0:
                self.fail_commits -= 1
                return 500, {}, {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return 400, {}, {"error": "commit header with a summary must come first"}
        staged: dict[str, bytes | None] = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                inline = base64.b64decode(value["content"])
                if len(inline) > TEN_MB or b"\x00" in inline[:8000]:
                    return 400, {}, {"error": f"Your push was rejected: {value['path']} is binary or over "
                                              "10 MB and must be stored with LFS/Xet"}
                staged[value["path"]] = inline
            elif key == "lfsFile":
                stored = self.lfs.get(value["oid"])
                if stored is None or len(stored) != value["size"]:
                    return 422, {}, {"error": f"LFS object for {value['path']} was never uploaded"}
                staged[value["path"]] = stored
            elif key in ("deletedFile", "deletedFolder"):
                staged[value["path"]] = None
            else:
                return 400, {}, {"error": f"unknown commit operation {key}"}
        with self.lock:
            for path, data in staged.items():
                if data is None:
                    for p in [p for p in repo.files if p == path or p.startswith(path.rstrip("/") + "/")]:
                        del repo.files[p]
                else:
                    repo.files[path] = data
            oid = hashlib.sha1(f"{ns}/{name}{len(repo.commits)}{sorted(staged)}".encode()).hexdigest()
            repo.commits.append(lines[0]["value"]["summary"])
        return 200, {}, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{ns}/{name}/commit/{oid}"}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # httpx streams files
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self) -> None:
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            url = urlsplit(self.path)
            status, extra, payload = hub.handle(self.command, url.path, url.query, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", extra.pop("Content-Type", "application/json"))
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

    return Handler
