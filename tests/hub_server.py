"""A small stand-in for the Hugging Face Hub's HTTP API, on 127.0.0.1, for upload and streaming tests.

It answers the calls `huggingface_hub` makes to create a repo, make a branch, ask how to upload
files (always "regular": contents travel base64-encoded inside the commit) and commit; it stores
each committed file under `root/<repo_id>/<revision>/` and records every request.

For reading it serves what `HfFileSystem` asks of a dataset repo held in `root/<repo_id>/<revision>/`:
repo info, the tree listing, and file downloads (HEAD with size and ETag, GET with byte ranges).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


class HubStandIn:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def repo_dir(self, repo_id: str, revision: str):
        folder = self.root / repo_id / revision
        return folder if folder.is_dir() else None

    @staticmethod
    def files(repo: Path) -> list[str]:
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())

    def commit_sha(self, repo: Path) -> str:
        """A stand-in commit id: it changes whenever a file's name or content does."""
        digest = hashlib.sha1()
        for name in self.files(repo):
            digest.update(name.encode() + b"\0" + (repo / name).read_bytes())
        return digest.hexdigest()

    def tree(self, repo: Path, folder: str, recursive: bool) -> list[dict]:
        """The tree endpoint's entries under `folder`: files with size, git blob id and LFS sha256; folders."""
        base = repo / folder if folder else repo
        entries = []
        for path in sorted(base.rglob("*") if recursive else base.iterdir()):
            name = path.relative_to(repo).as_posix()
            if path.is_dir():
                entries.append({"type": "directory", "path": name, "oid": hashlib.sha1(name.encode()).hexdigest()})
                continue
            content = path.read_bytes()
            entries.append({"type": "file", "path": name, "size": len(content),
                            "oid": hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest(),
                            "lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}})
        return entries

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, code: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head: bool = False):
                hub.requests.append({"method": "HEAD" if head else "GET", "path": self.path,
                                     "auth": self.headers.get("Authorization"), "range": self.headers.get("Range")})
                path = urllib.parse.urlsplit(self.path).path
                if match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    repo = hub.repo_dir(match.group(1), urllib.parse.unquote(match.group(2) or "main"))
                    if repo is None:
                        return self._not_found("RepoNotFound")
                    return self._reply(200, {"id": match.group(1), "sha": hub.commit_sha(repo), "private": False,
                                             "siblings": [{"rfilename": f} for f in hub.files(repo)]})
                if match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                    repo = hub.repo_dir(match.group(1), urllib.parse.unquote(match.group(2)))
                    if repo is None:
                        return self._not_found("RepoNotFound")
                    recursive = "recursive=true" in urllib.parse.urlsplit(self.path).query.lower()
                    return self._reply(200, hub.tree(repo, urllib.parse.unquote(match.group(3) or ""), recursive))
                if match := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    repo = hub.repo_dir(match.group(1), urllib.parse.unquote(match.group(2)))
                    file = repo / urllib.parse.unquote(match.group(3)) if repo else None
                    if file is None or not file.is_file():
                        return self._not_found("EntryNotFound" if repo else "RepoNotFound")
                    return self._send_file(file, repo, head)
                self._reply(404, {"error": "not found"})

            def _send_file(self, file: Path, repo: Path, head: bool) -> None:
                content = file.read_bytes()
                start, end, status = 0, len(content), 200
                if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                    start = int(match.group(1))
                    end = min(int(match.group(2)) + 1, len(content)) if match.group(2) else len(content)
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(end - start))
                self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
                self.send_header("X-Repo-Commit", hub.commit_sha(repo))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(content)}")
                self.end_headers()
                if not head:
                    self.wfile.write(content[start:end])

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append({"method": "POST", "path": self.path, "auth": self.headers.get("Authorization")})
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = "/".join(p for p in (request.get("organization"), request["name"]) if p)
                    return self._reply(200, {"url": f"{hub.endpoint}/datasets/{repo_id}"})
                if self.path == "/api/validate-yaml":  # the card's front matter must parse
                    try:
                        yaml.safe_load(json.loads(body)["content"].split("---\n")[1])
                    except (yaml.YAMLError, IndexError) as e:
                        return self._reply(400, {"errors": [{"message": str(e)}]})
                    return self._reply(200, {"warnings": []})
                if match := re.fullmatch(r"/api/datasets/(.+)/branch/(.+)", self.path):
                    return self._reply(200, {})
                if match := re.fullmatch(r"/api/datasets/(.+)/preupload/(.+)", self.path):
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})
                if match := re.fullmatch(r"/api/datasets/(.+)/commit/(.+)", self.path):
                    repo_id, revision = match.group(1), match.group(2).replace("%2F", "/")
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {}
                    for line in lines:
                        if line["key"] == "file":
                            value = line["value"]
                            content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                            files[value["path"]] = content
                            target = hub.root / repo_id / revision / value["path"]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(content)
                    oid = hashlib.sha1(body).hexdigest()
                    hub.commits.append({"repo_id": repo_id, "revision": revision, "files": sorted(files),
                                        "summary": lines[0]["value"].get("summary")})
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/datasets/{repo_id}/commit/{oid}",
                                             "commitOid": oid, "pullRequestUrl": None})
                self._reply(404, {"error": f"no such endpoint {self.path}"})

        return Handler
