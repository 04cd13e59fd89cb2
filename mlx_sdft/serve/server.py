"""`mlx-sdft serve`: OpenAI-compatible routes over `http.server.ThreadingHTTPServer` (as
mlx_lm.server does), answering with `Engine` and keeping every exchange in the store.

    POST /v1/chat/completions   stream false: one JSON answer; true: server-sent events
    GET  /v1/models
    POST /v1/feedback           {"id": EXCHANGE, "answer": "..."} or {"id": EXCHANGE, "feedback": "..."}

The exchange is committed before the last byte of its answer is sent (for a stream: before the
chunk with `finish_reason`), and the answer's `id` is the exchange id. A bad request gets an
OpenAI error object with its status and stores nothing.
"""

from __future__ import annotations

import hmac
import json
import select
import signal
import socket
import sys
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mlx_sdft.config import ServeConfig
from mlx_sdft.errors import InputError
from mlx_sdft.serve import openai
from mlx_sdft.serve.engine import Engine
from mlx_sdft.serve.learner import Learner
from mlx_sdft.serve.openai import BadRequest
from mlx_sdft.store import lessons
from mlx_sdft.store.db import Store, new_exchange_id

MAX_BODY = 16 << 20  # bytes; a chat request is far smaller


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        self._route({"/v1/models": self._models})

    def do_POST(self) -> None:
        self._route({"/v1/chat/completions": self._chat, "/v1/feedback": self._feedback})

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"mlx-sdft serve: {self.address_string()} {format % args}\n")

    def _route(self, routes: dict) -> None:
        try:
            handler = routes.get(self.path.split("?", 1)[0])
            if handler is None:
                raise BadRequest(f"no route {self.command} {self.path}", 404, "not_found_error")
            self._authorize()
            handler()
        except BadRequest as e:
            self._json(e.status, openai.error(str(e), e.kind, e.param))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nothing to answer
        except Exception as e:  # answer, and keep serving
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            self._json(500, openai.error(f"internal error ({type(e).__name__})", "server_error"))

    def _authorize(self) -> None:
        key = self.server.cfg.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):  # RFC 6750
            raise BadRequest("missing or wrong API key (send the header Authorization: Bearer KEY)", 401,
                             "authentication_error")

    def _body(self) -> object:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # read as empty, it would be "not an object"
            raise BadRequest("a chunked body is not read: send the body with a Content-Length", 411)
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = -1
        if length < 0:
            raise BadRequest("bad Content-Length")
        if length > MAX_BODY:
            raise BadRequest(f"the body is over {MAX_BODY} bytes", 413)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the body is not valid JSON ({str(e).splitlines()[0]})") from None

    def _client_gone(self) -> bool:
        """The client closed its end: it sent its whole request, so a readable socket means EOF."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # ---- routes -------------------------------------------------------------------------

    def _models(self) -> None:
        self._json(200, openai.models(self.server.cfg.model, self.server.engine.version))

    def _chat(self) -> None:
        cfg = self.server.cfg
        request = openai.parse_chat(self._body(), cfg.max_tokens, cfg.temperature, cfg.top_p)
        if request.stream:
            return self._stream(request)
        pieces = []
        with closing(self.server.engine.answer(request)) as answer:
            for piece in answer:
                pieces.append(piece)
                if piece.finish_reason is None and self._client_gone():
                    return  # closing the answer stops the generation; nothing is stored
        answer, last = "".join(p.text for p in pieces), pieces[-1]
        id = self.server.keep(request, answer, last)  # committed before the answer is sent
        self._json(200, openai.completion(id, cfg.model, answer, last.finish_reason, last.prompt_tokens,
                                          last.completion_tokens, last.version))

    def _stream(self, request: openai.ChatRequest) -> None:
        id, sent, text = new_exchange_id(), False, []
        try:
            for piece in self.server.engine.answer(request):  # an error before the first piece gets its status from _route
                if not sent:
                    self._open_stream(id, piece.version)
                    sent = True
                text.append(piece.text)
                self._send_piece(request, id, piece, "".join(text))
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:
            if not sent:
                raise
            self.log_error("generation failed mid-stream: %s: %s", type(e).__name__, e)
            self._event(openai.error(f"generation failed ({type(e).__name__})", "server_error"))

    def _open_stream(self, id: str, version: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self._event(openai.chunk(id, self.server.cfg.model, version, {"role": "assistant", "content": ""}))

    def _send_piece(self, request: openai.ChatRequest, id: str, piece, answer: str) -> None:
        model = self.server.cfg.model
        if piece.finish_reason is None:
            if piece.text:
                self._event(openai.chunk(id, model, piece.version, {"content": piece.text}))
            return
        self.server.keep(request, answer, piece, id)  # committed before the answer ends
        self._event(openai.chunk(id, model, piece.version, {"content": piece.text} if piece.text else {},
                                 piece.finish_reason))
        if request.include_usage:
            usage = openai.usage(piece.prompt_tokens, piece.completion_tokens)
            self._event(openai.chunk(id, model, piece.version, None, usage_=usage))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _feedback(self) -> None:
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise BadRequest('the body must be {"id": EXCHANGE_ID, "answer" or "feedback": TEXT}', param="id")
        given = [k for k in ("answer", "feedback") if k in body]
        if len(given) != 1 or not isinstance(body[given[0]], str) or not body[given[0]].strip():
            raise BadRequest('give one of "answer" (the answer you wanted) or "feedback" (what was wrong), '
                             "a non-empty string", param="answer")
        store = self.server.store
        exchange = store.exchange(body["id"])
        if exchange is None:
            raise BadRequest(f"no exchange {body['id']!r} in this store", 404, "not_found_error", "id")
        kind = "demonstration" if given[0] == "answer" else "feedback"
        try:
            lesson = lessons.from_exchange(exchange, kind, body[given[0]], self.server.cfg.feedback_template)
        except InputError as e:
            raise BadRequest(str(e), param="id") from None
        lesson_id = store.add_lesson(**lesson)
        self.server.learner.poke(len(store.lessons("new")))
        self._json(200, {"object": "lesson", "id": lesson_id, "kind": kind, "exchange": exchange["id"], "state": "new"})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cfg: ServeConfig, engine: Engine, store: Store):
        self.cfg, self.engine, self.store, self.learner = cfg, engine, store, Learner(cfg)
        # the family of the address --host names (http.server assumes IPv4, so "::1" would not bind)
        self.address_family = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((cfg.host, cfg.port), Handler)

    def keep(self, request: openai.ChatRequest, answer: str, last, id: str | None = None) -> str:
        """Commit the exchange (and with --hindsight the lesson it implies); returns its id."""
        id = self.store.add_exchange(messages=request.messages, tools=request.tools, answer=answer,
                                     model=self.cfg.model, version=last.version, sampling=request.sampling(),
                                     finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                                     completion_tokens=last.completion_tokens, id=id)
        if self.cfg.hindsight and (earlier := self.store.continued(request.messages)):
            try:
                lesson = lessons.from_exchange(earlier, "hindsight", request.messages[-1]["content"],
                                               self.cfg.hindsight_template)
            except InputError:  # the earlier exchange cannot be a lesson (no user turn to end its prompt)
                return id
            self.store.add_lesson(**lesson)
            self.learner.poke(len(self.store.lessons("new")))
        return id


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM. Bad options, model or store: InputError before listening."""
    store = Store(cfg.home, cfg.redact)
    store.check()
    engine = Engine(cfg)
    try:
        server = Server(cfg, engine, store)
    except OSError as e:
        raise InputError(f"--host/--port: cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})") from None
    signal.signal(signal.SIGTERM, _interrupt)  # stop as Ctrl-C does: the store closes cleanly
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    print(f"mlx-sdft serve: listening on http://{host}:{port}/v1 (model {cfg.model}, adapter version "
          f"{engine.version}, store {store.path})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
