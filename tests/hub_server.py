"""A minimal local stand-in for the Hub's file endpoint, so that huggingface_hub's own
hf_hub_download can fill a real cache in the tests (no network): GET/HEAD
/{org}/{name}/resolve/{revision}/{file} serves ROOT/{revision}/{file} with the headers the
client reads (X-Repo-Commit: a commit hash per revision; ETag: the content's sha256)."""
import hashlib
import http.server
import os
import threading


def serve(root):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _file(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            p = os.path.join(root, parts[3], *parts[4:])
            return (parts[3], p) if os.path.isfile(p) else None

        def _head(self):
            found = self._file()
            if not found:
                self.send_response(404)
                self.end_headers()
                return None
            rev, p = found
            with open(p, "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("X-Repo-Commit", hashlib.sha1(rev.encode()).hexdigest())
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return data

        def do_HEAD(self):
            self._head()

        def do_GET(self):
            data = self._head()
            if data is not None:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
