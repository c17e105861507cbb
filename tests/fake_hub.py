"""A local stand-in for the Hugging Face Hub's file endpoints, to test downloads without network.

It answers the requests huggingface_hub makes for `hf_hub_download` and `list_repo_files`:
HEAD / GET `/<repo>/resolve/<revision>/<file>` (with the X-Repo-Commit, ETag and size headers
the client reads, and the X-Error-Code headers the Hub sends for missing repos, revisions and
files, and for gated repos) and GET `/api/models/<repo>/tree/<revision>`. Requests are logged so a
test can assert which files were fetched.
"""
import hashlib
import http.server
import json
import threading
import urllib.parse

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
  """Serves {repo: {filename: bytes}} at http://127.0.0.1:<port>; `gated` repos refuse files."""

  def __init__(self, repos: dict, gated=()):
    self.repos, self.gated, self.requests = repos, set(gated), []
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # keep pytest's output clean
        pass

      def do_HEAD(self):
        hub._answer(self, body=False)

      def do_GET(self):
        hub._answer(self, body=True)

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()

  def _send(self, handler, status, headers, data=b"", body=True):
    handler.send_response(status)
    for key, value in headers.items():
      handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if body and data:
      handler.wfile.write(data)

  def _error(self, handler, status, code, body):
    self._send(handler, status, {"X-Error-Code": code, "X-Error-Message": code},
               json.dumps({"error": code}).encode(), body)

  def _answer(self, handler, body):
    path = urllib.parse.urlparse(handler.path).path
    self.requests.append((handler.command, path))
    if path.startswith("/api/models/"):
      repo, _, revision = path[len("/api/models/"):].partition("/tree/")
      if repo not in self.repos:
        return self._error(handler, 404, "RepoNotFound", body)
      listing = [{"type": "file", "path": name, "size": len(data),
                  "oid": hashlib.sha1(data).hexdigest()}
                 for name, data in sorted(self.repos[repo].items())]
      return self._send(handler, 200, {"Content-Type": "application/json"},
                        json.dumps(listing).encode(), body)
    parts = path.strip("/").split("/")
    if len(parts) < 5 or parts[2] != "resolve":
      return self._error(handler, 404, "RepoNotFound", body)
    repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
    if repo not in self.repos:
      return self._error(handler, 404, "RepoNotFound", body)
    if repo in self.gated:
      return self._error(handler, 403, "GatedRepo", body)
    if revision not in ("main", COMMIT):
      return self._error(handler, 404, "RevisionNotFound", body)
    files = self.repos[repo]
    if filename not in files:
      handler.send_response(404)
      handler.send_header("X-Error-Code", "EntryNotFound")
      handler.send_header("X-Repo-Commit", COMMIT)
      handler.send_header("Content-Length", "0")
      handler.end_headers()
      return None
    data = files[filename]
    return self._send(handler, 200, {"X-Repo-Commit": COMMIT,
                                     "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data, body)
