"""`mlx-sdft serve`: OpenAI-compatible routes over `http.server.ThreadingHTTPServer` (as
mlx_lm.server does), answering with `Engine` and keeping every exchange in the store.

    POST /v1/chat/completions   stream false: one JSON answer; true: server-sent events
    GET  /v1/models
    POST /v1/feedback           {"id": EXCHANGE, "answer": "..."} or {"id": EXCHANGE, "feedback": "..."}

The exchange is committed before the last byte of its answer is sent (for a stream: before the
chunk with `finish_reason`), and the answer's `id` is the exchange id. A bad request gets an
OpenAI error object with its status and stores nothing.

Only this machine's names (and --host, --allowed-host) are answered, so a web page whose name
re-resolves to 127.0.0.1 (DNS rebinding) gets 403; a request from a web page (it carries an
`Origin`) is answered only from the server's own origin or an --allowed-origin one. HTTP/1.1:
a stream is chunked, so a stream cut by a dying server is an error to the client, not an end.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import select
import signal
import socket
import sys
import threading
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from mlx_sdft.config import LOOPBACK, ServeConfig
from mlx_sdft.config.options import check_regex
from mlx_sdft.errors import InputError
from mlx_sdft.opening import open_tokenizer_for
from mlx_sdft.serve import openai
from mlx_sdft.serve.engine import Engine
from mlx_sdft.serve.learner import Learner
from mlx_sdft.serve.openai import BadRequest
from mlx_sdft.store import lessons, rules
from mlx_sdft.store.db import FILENAME, STANDING, Store, new_exchange_id

MAX_BODY = 16 << 20  # bytes; a chat request is far smaller
RETRY_AFTER = 5  # seconds, in the Retry-After of a 503 when --max-queue requests already wait


class Busy(BadRequest):
    """503 with Retry-After: the model is answering one request and --max-queue more wait for it."""

    def __init__(self, message: str):
        super().__init__(message, 503, "server_error")
        self.headers = {"Retry-After": str(RETRY_AFTER)}


def host_name(value: str) -> str:
    """The host of a Host header, --host or --allowed-host: no port, no IPv6 brackets, lower case,
    an IP address in its one written form."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    value = value.rstrip(".")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


class Handler(BaseHTTPRequestHandler):
    server: Server
    # keep-alive, and a stream's body is chunked: a stream cut short (the server died) is an error to the
    # client, where HTTP/1.0's close-delimited body looked like a normal end
    protocol_version = "HTTP/1.1"
    _cors: str | None = (
        None  # the allowed foreign Origin this answer names in Access-Control-Allow-Origin
    )
    _chunked = False  # this answer's body is sent in chunks (an event stream to an HTTP/1.1 client)

    def do_GET(self) -> None:
        self._route({"/v1/models": self._models})

    def do_POST(self) -> None:
        self._route({"/v1/chat/completions": self._chat, "/v1/feedback": self._feedback})

    def do_OPTIONS(self) -> None:
        """A browser's CORS preflight (a page of an --allowed-origin); no API key, as browsers send none."""
        paths = ("/v1/models", "/v1/chat/completions", "/v1/feedback")
        self._route(dict.fromkeys(paths, self._preflight), authorize=False)

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"mlx-sdft serve: {self.address_string()} {format % args}\n")

    def _route(self, routes: dict, authorize: bool = True) -> None:
        self._cors, self._chunked = (
            None,
            False,
        )  # one handler answers every request of a kept-alive connection
        try:
            self._check_host()
            self._check_origin()
            handler = routes.get(self.path.split("?", 1)[0])
            if handler is None:
                raise BadRequest(f"no route {self.command} {self.path}", 404, "not_found_error")
            if authorize:
                self._authorize()
            handler()
        except BadRequest as e:
            self._json(e.status, openai.error(str(e), e.kind, e.param), getattr(e, "headers", None))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer
        except Exception as e:  # answer, and keep serving
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            self._json(500, openai.error(f"internal error ({type(e).__name__})", "server_error"))

    def _check_host(self) -> None:
        """DNS rebinding: a web page whose name re-resolves to 127.0.0.1 sends that name as Host."""
        hosts = self.server.hosts
        if "*" not in hosts and host_name(self.headers.get("Host", "")) not in hosts:
            raise BadRequest(
                f"Host {self.headers.get('Host', '')!r} is not a name of this server: it answers "
                "127.0.0.1, localhost, [::1] and --host (more with --allowed-host)",
                403,
                "permission_error",
            )

    def _check_origin(self) -> None:
        """A web page's request carries its Origin (curl and the OpenAI SDKs send none): answered only
        from this server's own origin or an --allowed-origin one, whose answers then name it for CORS."""
        origin = self.headers.get("Origin")
        if origin is None or self._own_origin(origin):
            return
        allowed = self.server.origins
        if "*" not in allowed and origin.strip().lower().rstrip("/") not in allowed:
            raise BadRequest(
                f"requests from web pages of {origin!r} are refused (allow its origin with "
                "--allowed-origin)",
                403,
                "permission_error",
            )
        self._cors = origin.strip()

    def _own_origin(self, origin: str) -> bool:
        """http://HOST:PORT with HOST a name this server answers (not by a * wildcard) and its port."""
        try:
            parts = urlsplit(origin.strip())
            port = parts.port or 80
        except ValueError:
            return False
        return (
            parts.scheme.lower() == "http"
            and parts.hostname is not None
            and port == self.server.server_address[1]
            and host_name(parts.hostname) in self.server.hosts - {"*"}
        )

    def end_headers(self) -> None:
        if self._cors:
            self.send_header("Access-Control-Allow-Origin", self._cors)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def _authorize(self) -> None:
        key = self.server.cfg.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), key.encode()
        ):  # RFC 6750
            raise BadRequest(
                "missing or wrong API key (send the header Authorization: Bearer KEY)",
                401,
                "authentication_error",
            )

    def _body(self) -> object:
        if (
            "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        ):  # read as empty, it would be "not an object"
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

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if (
            status >= 400
        ):  # the request's body may be unread: it must not be read as the next request
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send(self, data: bytes) -> None:
        """Part of a stream's body: one chunk of the chunked encoding, or as is to an HTTP/1.0 client."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        self.wfile.flush()

    def _end_stream(self) -> None:
        if self._chunked:
            self.wfile.write(
                b"0\r\n\r\n"
            )  # the last chunk: without it the client knows the stream was cut
            self.wfile.flush()

    def _preflight(self) -> None:
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header(
            "Access-Control-Allow-Headers",
            self.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type"),
        )
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # ---- routes -------------------------------------------------------------------------

    def _models(self) -> None:
        self._json(200, openai.models(self.server.cfg.model, self.server.engine.version))

    def _chat(self) -> None:
        cfg = self.server.cfg
        request = openai.parse_chat(self._body(), cfg.max_tokens, cfg.temperature, cfg.top_p)
        self.server.engine.check_literal(
            request
        )  # a control token's text in a message: 400, never that token
        with (
            self.server.admit() as done
        ):  # a 503 when --max-queue requests already wait for the model
            return self._stream(request, done) if request.stream else self._answer(request, done)

    def _answer(self, request: openai.ChatRequest, done: Callable[[], None]) -> None:
        cfg = self.server.cfg
        pieces = []
        with closing(self.server.engine.answer(request)) as answer:
            for piece in answer:
                pieces.append(piece)
                if piece.finish_reason is None and self._client_gone():
                    self.close_connection = True
                    return  # closing the answer stops the generation; nothing is stored
        answer, last = "".join(p.text for p in pieces), pieces[-1]
        id = self.server.keep(request, answer, last)  # committed before the answer is sent
        done()  # the model is free before the client has its answer, so its next request is admitted
        self._json(
            200,
            openai.completion(
                id,
                cfg.model,
                answer,
                last.finish_reason,
                last.prompt_tokens,
                last.completion_tokens,
                last.fingerprint,
            ),
        )

    def _stream(self, request: openai.ChatRequest, done: Callable[[], None]) -> None:
        id, sent, text = new_exchange_id(), False, []
        try:
            for piece in self.server.engine.answer(
                request
            ):  # an error before the first piece gets its status from _route
                if not sent:
                    self._open_stream(id, piece.fingerprint)
                    sent = True
                text.append(piece.text)
                if piece.finish_reason is not None:
                    done()  # the model is free before the client reads [DONE]
                self._send_piece(request, id, piece, "".join(text))
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:
            if not sent:
                raise
            self.log_error("generation failed mid-stream: %s: %s", type(e).__name__, e)
            self._event(openai.error(f"generation failed ({type(e).__name__})", "server_error"))
            self._end_stream()
            self.close_connection = True

    def _open_stream(self, id: str, fingerprint: str) -> None:
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # an HTTP/1.0 client cannot read chunks: its stream ends when the connection closes
        self.send_header(
            *(("Transfer-Encoding", "chunked") if self._chunked else ("Connection", "close"))
        )
        self.end_headers()
        self._event(
            openai.chunk(
                id, self.server.cfg.model, fingerprint, {"role": "assistant", "content": ""}
            )
        )

    def _send_piece(self, request: openai.ChatRequest, id: str, piece, answer: str) -> None:
        model = self.server.cfg.model
        if piece.finish_reason is None:
            if piece.text:
                self._event(openai.chunk(id, model, piece.fingerprint, {"content": piece.text}))
            return
        self.server.keep(request, answer, piece, id)  # committed before the answer ends
        self._event(
            openai.chunk(
                id,
                model,
                piece.fingerprint,
                {"content": piece.text} if piece.text else {},
                piece.finish_reason,
            )
        )
        if request.include_usage:
            usage = openai.usage(piece.prompt_tokens, piece.completion_tokens)
            self._event(openai.chunk(id, model, piece.fingerprint, None, usage_=usage))
        self._send(b"data: [DONE]\n\n")
        self._end_stream()

    def _event(self, body: dict) -> None:
        self._send(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")

    def _feedback(self) -> None:
        """A lesson on an exchange ({"id", "answer" or "feedback", "always"?}), or a standing rule
        or fact on its own ({"rule" or "fact": TEXT, "check"?: REGEX})."""
        body = self._body()
        if isinstance(body, dict) and any(k in body for k in STANDING):
            return self._standing(body)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise BadRequest(
                'the body must be {"id": EXCHANGE_ID, "answer" or "feedback": TEXT}, or '
                '{"rule" or "fact": TEXT}',
                param="id",
            )
        given = [k for k in ("answer", "feedback") if k in body]
        if len(given) != 1 or not isinstance(body[given[0]], str) or not body[given[0]].strip():
            raise BadRequest(
                'give one of "answer" (the answer you wanted) or "feedback" (what was wrong), '
                "a non-empty string",
                param="answer",
            )
        if body.get("always") not in (None, False, True) or (
            body.get("always") and given[0] != "feedback"
        ):
            raise BadRequest(
                '"always": true or false, with "feedback" (a rule for every answer)', param="always"
            )
        store = self.server.store
        exchange = store.exchange(body["id"])
        if exchange is None:
            raise BadRequest(
                f"no exchange {body['id']!r} in this store", 404, "not_found_error", "id"
            )
        if body.get("always"):
            return self._standing(
                {"rule": body["feedback"], "check": body.get("check")}, exchange["id"]
            )
        kind = "demonstration" if given[0] == "answer" else "feedback"
        try:
            lesson = lessons.from_exchange(
                exchange, kind, body[given[0]], self.server.cfg.feedback_template
            )
        except InputError as e:
            raise BadRequest(str(e), param="id") from None
        self.server.engine.check_lesson(
            lesson, body[given[0]], given[0]
        )  # one learn could never use: 400
        lesson_id = store.add_lesson(**lesson)
        self.server.learner.poke(len(store.lessons("new")))
        self._json(
            200,
            {
                "object": "lesson",
                "id": lesson_id,
                "kind": kind,
                "exchange": exchange["id"],
                "state": "new",
            },
        )

    def _standing(self, body: dict, exchange: str | None = None) -> None:
        kinds = [k for k in STANDING if k in body]
        if len(kinds) != 1 or not isinstance(body[kinds[0]], str) or not body[kinds[0]].strip():
            raise BadRequest('give one of "rule" or "fact", a non-empty string', param="rule")
        check = body.get("check")
        if check is not None and not isinstance(check, str):
            raise BadRequest('"check": a regular expression (a string)', param="check")
        try:
            check = check_regex(check, "check")
        except InputError as e:
            raise BadRequest(str(e), param="check") from None
        self.server.engine.check_text(body[kinds[0]], kinds[0])
        try:
            text = rules.check_text(body[kinds[0]], kinds[0])
        except InputError as e:
            raise BadRequest(str(e), param=kinds[0]) from None
        store = self.server.store
        lesson_id = store.add_lesson(
            kind=kinds[0], text=text, check_regex=check, exchange_id=exchange
        )
        self.server.learner.poke(len(store.lessons("new")))
        self._json(
            200,
            {
                "object": "lesson",
                "id": lesson_id,
                "kind": kinds[0],
                "exchange": exchange,
                "state": "new",
                "in_prompt": self.server.cfg.rules_in_prompt != "never",
            },
        )


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cfg: ServeConfig, engine: Engine | None = None, store: Store | None = None):
        """Binds the port at once; `run` attaches the engine and store before serving."""
        self.cfg, self.engine, self.store, self.learner = cfg, engine, store, Learner(cfg)
        self.hosts = {host_name(h) for h in (*LOOPBACK, cfg.host, *cfg.allowed_host)}  # "*": any
        self.origins = {o.strip().lower().rstrip("/") for o in cfg.allowed_origin}  # "*": any
        self._admitted, self._admitting = (
            0,
            threading.Lock(),
        )  # requests for the model: answered or waiting
        # the family of the address --host names (http.server assumes IPv4, so "::1" would not bind)
        self.address_family = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((cfg.host, cfg.port), Handler)

    @contextmanager
    def admit(self):
        """One request for the model, which answers one at a time: it may wait behind the one being
        answered and up to --max-queue others; one more is a 503 with Retry-After, not a silent wait."""
        with self._admitting:
            if self._admitted > self.cfg.max_queue:
                raise Busy(
                    f"the server is busy: one request is being answered and {self.cfg.max_queue} wait "
                    f"(--max-queue); try again in {RETRY_AFTER} s"
                )
            self._admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._admitting:
                if not released:
                    self._admitted, released = self._admitted - 1, True

        try:
            yield release  # the handler calls it once the answer is complete; it runs at the end anyway
        finally:
            release()

    def keep(self, request: openai.ChatRequest, answer: str, last, id: str | None = None) -> str:
        """Commit the exchange (and with --hindsight the lesson it implies); returns its id."""
        id = self.store.add_exchange(
            messages=request.messages,
            tools=request.tools,
            answer=answer,
            model=self.cfg.model,
            version=last.version,
            sampling=request.sampling(),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            id=id,
        )
        if self.cfg.hindsight and (earlier := self.store.continued(request.messages)):
            try:
                lesson = lessons.from_exchange(
                    earlier,
                    "hindsight",
                    request.messages[-1]["content"],
                    self.cfg.hindsight_template,
                )
            except (
                InputError
            ):  # the earlier exchange cannot be a lesson (no user turn to end its prompt)
                return id
            self.store.add_lesson(**lesson)
            self.learner.poke(len(self.store.lessons("new")))
        return id


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM. Bad options, port, model or store: InputError before
    listening; the port is taken first and the model checked before the home is created, so neither
    a busy port nor a missing model costs a model load or leaves an empty home behind."""
    try:
        server = Server(cfg)
    except OSError as e:
        raise InputError(
            f"--host/--port: cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})"
        ) from None
    store = None
    try:
        if (
            Path(cfg.home).expanduser() / FILENAME
        ).exists():  # a damaged store: said before the model loads
            store = Store(cfg.home, cfg.redact)
            store.check()
        opened = open_tokenizer_for(
            cfg
        )  # no such model, no chat template: before a new home is created
        store = store or Store(cfg.home, cfg.redact)
        engine = Engine(cfg, store, opened=opened)
    except BaseException:
        server.server_close()
        if store is not None:
            store.close()
        raise
    server.engine, server.store = engine, store
    signal.signal(signal.SIGTERM, _interrupt)  # stop as Ctrl-C does: the store closes cleanly
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    print(
        f"mlx-sdft serve: listening on http://{host}:{port}/v1 (model {cfg.model}, adapter version "
        f"{engine.version}, store {store.path})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
