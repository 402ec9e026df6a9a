"""A local stand-in for the Hugging Face Hub: enough of its HTTP API for the unmodified
``huggingface_hub`` client (pointed at it through ``HF_ENDPOINT``) to create repos and branches,
list refs and trees, commit folders (preupload + NDJSON commit, every file "regular") and download
a revision (``snapshot_download``: revision info, tree, ``resolve`` files).

Files are stored per commit, branches point at commits, so a test can read exactly what each branch
holds; the preupload answer carries the oid of files a revision already holds, so an upload of
unchanged files makes no commit (as on the Hub). Faults are injected the way the Hub misbehaves under load: the first ``rate_limit`` requests
that touch each revision (branch creation, preupload, commit; ``limit_only`` narrows it to some
``repo@revision``) get 429, and the ``fail_commit``-th
commit POST gets a 500 (nothing applied). ``hold_revision`` makes the commit to that revision wait
until ``release`` (the test kills the client meanwhile); a held commit is dropped, never applied.

The server runs on 127.0.0.1 in daemon threads and shuts itself down after ``max_seconds``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def git_blob_id(data: bytes) -> str:
    """Git's object id of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, rate_limit: int = 0, fail_commit: int | None = None, hold_revision: str | None = None,
                 limit_only: set[str] | None = None, max_seconds: float = 300.0):
        self.rate_limit, self.fail_commit, self.hold_revision = rate_limit, fail_commit, hold_revision
        self.limit_only = limit_only  # "repo@revision"s the rate limit applies to (default: all)
        self.repos: dict[str, dict] = {}
        self.commits: dict[str, dict[str, bytes]] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.per_revision: Counter = Counter()
        self.commit_posts = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_POST(self):
                hub._dispatch(self, "POST")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(max_seconds, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        self._timer.cancel()
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # --- what tests read ------------------------------------------------------------------------

    def branches(self, repo: str) -> dict[str, str]:
        return dict(self.repos[repo]["branches"])

    def files(self, repo: str, branch: str) -> dict[str, bytes]:
        return dict(self.commits[self.repos[repo]["branches"][branch]])

    def commits_to(self, repo: str) -> list[str]:
        """Revisions that received a commit POST answered 200, in order."""
        prefix = f"/api/models/{repo}/commit/"
        return [unquote(p[len(prefix):]) for m, p, s in self.log if m == "POST" and p.startswith(prefix) and s == 200]

    # --- HTTP -----------------------------------------------------------------------------------

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlparse(h.path).path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        try:
            status, payload = self._route(method, path, body)
        except KeyError as err:
            status, payload = 404, {"error": f"not found: {err}"}
        with self.lock:
            self.log.append((method, path, status))
        if status is None:  # a held commit whose client went away: drop the connection
            h.close_connection = True
            return
        headers = {}
        if isinstance(payload, tuple):  # a file download: (bytes, extra headers)
            data, headers = payload
        else:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        if status == 429:
            h.send_header("Retry-After", "0")
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)

    def _limited(self, repo: str, revision: str) -> bool:
        if self.limit_only is not None and f"{repo}@{revision}" not in self.limit_only:
            return False
        with self.lock:
            self.per_revision[(repo, revision)] += 1
            return self.per_revision[(repo, revision)] <= self.rate_limit

    def _route(self, method: str, path: str, body: bytes):
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):  # {org}/{name}/resolve/{rev}/{path}
            repo = f"{parts[0]}/{parts[1]}"
            commit = self._commit_of(repo, parts[3])
            data = self.commits[commit]["/".join(parts[4:])]
            return 200, (data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"',
                                "Content-Type": "application/octet-stream"})
        if parts[:2] != ["api", "models"] or len(parts) < 5:
            return 404, {"error": "unknown endpoint"}
        repo, action, rest = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
        state = self.repos[repo]
        if action == "refs" and method == "GET":
            return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                      for b, c in sorted(state["branches"].items())], "tags": [], "converts": []}
        if action == "revision" and method == "GET":  # repo_info (an upload with no change; downloads)
            commit = self._commit_of(repo, rest)
            return 200, {"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in sorted(self.commits[commit])]}
        if action == "tree" and method == "GET":
            files = self.commits[self._commit_of(repo, rest.split("/")[0])]
            return 200, [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                         for p, d in sorted(files.items())]
        if action in ("branch", "preupload", "commit") and method == "POST":
            if self._limited(repo, rest):
                return 429, {"error": "You have been rate-limited; retry later"}
            if action == "branch":
                if rest in state["branches"]:
                    return 409, {"error": "Reference already exists"}
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                state["branches"][rest] = state["branches"].get(start, start)
                return 200, {}
            if action == "preupload":  # every file "regular"; the oid of what the revision holds already
                have = self.commits[state["branches"][rest]]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": git_blob_id(have[f["path"]]) if f["path"] in have else None}
                                       for f in json.loads(body)["files"]]}
            return self._commit(repo, rest, body)
        return 404, {"error": "unknown endpoint"}

    def _commit_of(self, repo: str, revision: str) -> str:
        """A branch name or a commit id → the commit id (KeyError → 404)."""
        branches = self.repos[repo]["branches"]
        if revision in branches:
            return branches[revision]
        if revision in self.commits:
            return revision
        raise KeyError(revision)

    def _create_repo(self, req: dict):
        repo = f"{req.get('organization') or 'user'}/{req['name']}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
        oid = self._store({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self.repos[repo] = {"branches": {"main": oid}}
        return 200, {"url": f"{self.url}/{repo}", "name": repo}

    def _store(self, files: dict[str, bytes]) -> str:
        oid = hashlib.sha1(repr(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in files.items())).encode()
                           + str(time.time_ns()).encode()).hexdigest()
        self.commits[oid] = files
        return oid

    def _commit(self, repo: str, revision: str, body: bytes):
        with self.lock:
            self.commit_posts += 1
            fail = self.commit_posts == self.fail_commit
        if fail:
            return 500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
        if revision == self.hold_revision:
            self.held.set()
            self.release.wait(timeout=120)
            self.hold_revision = None  # once: a rerun's commit goes through
            return None, None
        state = self.repos[repo]
        files = dict(self.commits[state["branches"][revision]])
        ops = defaultdict(list)
        for line in body.decode().splitlines():
            if line.strip():
                item = json.loads(line)
                ops[item["key"]].append(item["value"])
        for value in ops["deletedFile"]:
            files.pop(value["path"], None)
        for value in ops["deletedFolder"]:
            files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        if ops["lfsFile"]:
            return 400, {"error": "this test hub stores regular files only"}
        for value in ops["file"]:
            files[value["path"]] = base64.b64decode(value["content"])
        oid = self._store(files)
        state["branches"][revision] = oid
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
