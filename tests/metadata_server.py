"""A loopback stand-in for the cloud metadata services' preemption notices.

AWS: ``PUT /latest/api/token`` gives an IMDSv2 session token (when ``imdsv2``);
``GET /latest/meta-data/spot/instance-action`` answers 404 until a notice is posted, then
200 with the instance-action JSON (``notices`` times, then 404 again, as on a new
machine). With ``require_token`` a GET without the token gets 401, as on instances that
enforce IMDSv2. GCP: ``GET /computeMetadata/v1/instance/preempted`` answers FALSE or TRUE
and needs ``Metadata-Flavor: Google`` (403 without).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AWS_PATH = "/latest/meta-data/spot/instance-action"
GCP_PATH = "/computeMetadata/v1/instance/preempted"
TOKEN = "test-token-123"
NOTICE = {"action": "terminate", "time": "2026-12-03T19:30:00Z"}


class MetadataServer:
    def __init__(self, imdsv2: bool = True, require_token: bool = False):
        self.imdsv2 = imdsv2
        self.require_token = require_token
        self.notices = 0
        self.gcp_preempted = False
        self.requests: list[tuple[str, str, bool]] = []  # method, path, had token
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def post_notice(self, times: int = 1) -> None:
        with self.lock:
            self.notices = times

    def __enter__(self) -> "MetadataServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, method: str, path: str, headers) -> tuple[int, str]:
        token_ok = headers.get("X-aws-ec2-metadata-token") == TOKEN
        with self.lock:
            self.requests.append((method, path, token_ok))
            if method == "PUT" and path == "/latest/api/token" and self.imdsv2:
                return 200, TOKEN
            if method == "GET" and path == AWS_PATH:
                if self.require_token and not token_ok:
                    return 401, ""
                if self.notices > 0:
                    self.notices -= 1
                    return 200, json.dumps(NOTICE)
                return 404, "Not Found"
            if method == "GET" and path == GCP_PATH:
                if headers.get("Metadata-Flavor") != "Google":
                    return 403, ""
                return 200, "TRUE" if self.gcp_preempted else "FALSE"
        return 404, "Not Found"

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str) -> None:
                code, body = server.answer(method, self.path, self.headers)
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                self._reply("GET")

            def do_PUT(self):  # noqa: N802
                self._reply("PUT")

            def log_message(self, *args):  # keep pytest output clean
                pass

        return Handler
