"""A local OpenAI-compatible endpoint for tests that need HTTP without a model: a threaded
server on 127.0.0.1 whose answers a test scripts (errors, garbage, slow replies, fixed texts)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_completion(content: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The body of a successful chat completion."""
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class EndpointHandler(BaseHTTPRequestHandler):
    """Reads each POST's JSON body and hands it to ``self.server.endpoint.handle(self, body)``."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.endpoint.handle(self, body)

    def send(self, status: int, text: str, headers: dict | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalEndpoint:
    """Subclasses define ``handle(handler, body)``; ``base_url`` is the /v1 root. A context
    manager: the server runs inside the with-block."""

    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), EndpointHandler)
        self.server.endpoint = self
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def handle(self, handler: EndpointHandler, body: dict) -> None:
        raise NotImplementedError

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
