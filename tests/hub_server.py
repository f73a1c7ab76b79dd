"""A small stand-in for the Hugging Face Hub's HTTP API, on 127.0.0.1, for upload tests.

It answers the calls `huggingface_hub` makes to create a repo, make a branch, ask how to upload
files (always "regular": contents travel base64-encoded inside the commit) and commit; it stores
each committed file under `root/<repo_id>/<revision>/` and records every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
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

            def do_GET(self):
                hub.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
                self._reply(404, {"error": "not found"})

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
