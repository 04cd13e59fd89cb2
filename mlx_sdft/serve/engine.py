"""The model `serve` answers with: the base model plus the home's current adapter version,
generating with mlx-lm (`stream_generate`, `make_sampler`) on one worker thread.

All model calls run on that one thread, one request at a time (as mlx_lm.server does): the
thread is the lock. Between two requests it reads HOME/current.json and, when the version
changed, swaps the adapter weights in place with `model.load_weights(strict=False)`, as
`core.teacher.using` swaps leaves; no second model is loaded, and the server never restarts.
"""

from __future__ import annotations

import queue
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from mlx_sdft.config import TEACHER_TEMPLATE, ServeConfig
from mlx_sdft.core.prompts import (
    encode,
    render,
    special_text_in,
    teacher_text,
    template_system_prompt,
    with_rules,
)
from mlx_sdft.errors import InputError
from mlx_sdft.formats.models import Adapters, attach_adapters, check_adapter_fit, open_model
from mlx_sdft.opening import open_model_for, open_tokenizer_for
from mlx_sdft.serve.openai import BadRequest, ChatRequest
from mlx_sdft.store import rules, versions
from mlx_sdft.store.db import Store


@dataclass(frozen=True)
class Piece:
    """A segment of the answer; the last one has `finish_reason` ("stop" or "length") and the counts."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    version: int
    rules: str = ""  # the digest of the rules in the prompt ("" for none)

    @property
    def fingerprint(self) -> str:
        """`system_fingerprint`: what answered, the adapter version and the rules in the prompt."""
        return f"adapters-v{self.version}" + (f"-rules-{self.rules}" if self.rules else "")


class Engine:
    def __init__(self, cfg: ServeConfig, store: Store | None = None, opened: tuple | None = None):
        self.home, self.store, self.rules_in_prompt = cfg.home, store, cfg.rules_in_prompt
        # no chat template: InputError before listening (`opened`: serve checked the tokenizer already)
        self.path, self.tokenizer = opened = opened or open_tokenizer_for(cfg)
        self.default_system = template_system_prompt(
            self.tokenizer
        )  # the rules add to it, as in training
        self._refused: set[int] = (
            set()
        )  # rules left out of the prompt for control-token text (said once)
        self.model, _, _ = open_model_for(cfg, opened=opened)
        # the model's context (None: its config does not say); a longer prompt is refused, not answered with noise
        self.context = getattr(getattr(self.model, "args", None), "max_position_embeddings", None)
        self.version, self.failed = 0, None
        self._shape, self._base = (
            None,
            None,
        )  # the attached adapters' (type, layers, parameters), their "off" leaves
        self._jobs: queue.Queue = queue.Queue()
        self.refresh(strict=True)
        threading.Thread(target=self._work, name="mlx-sdft-generate", daemon=True).start()

    # ---- versions -----------------------------------------------------------------------

    def refresh(self, strict: bool = False) -> None:
        """Switch to the current version if it changed. A version that will not load is reported
        once and skipped (the last good one keeps serving); with `strict` (at start) it is an error."""
        wanted = None
        try:
            wanted = versions.current(self.home)
            if wanted not in (self.version, self.failed):
                self._switch(wanted)
        except Exception as e:  # a bad pointer or adapter folder must not stop the server
            if strict:
                raise InputError(str(e)) from None
            if wanted is not None and wanted == self.failed:
                return
            self.failed = wanted
            print(
                f"mlx-sdft serve: cannot switch adapters ({type(e).__name__}: {e}); still serving version "
                f"{self.version}",
                file=sys.stderr,
                flush=True,
            )

    def _switch(self, version: int) -> None:
        """Everything that can fail (reading the folder, the recorded sha256, adapters that do not fit
        this model) happens before the serving model changes."""
        model, shape, base = self.model, self._shape, self._base
        if version:
            folder = versions.version_dir(self.home, version)
            versions.verify(
                self.home, version
            )  # accepted, not erased, its files those it was built with
            adapters = Adapters.saved(
                folder
            )  # read and checked as every command reads an adapter folder
            # as generate, eval and export check them: a version trained for another model is refused
            check_adapter_fit(
                self.path,
                adapters.weights,
                adapters.fine_tune_type,
                adapters.num_layers,
                adapters.lora_parameters,
                folder / "adapter_config.json",
            )
            weights = mx.load(str(adapters.weights))
            wanted = (adapters.fine_tune_type, adapters.num_layers, adapters.lora_parameters)
            if shape not in (
                None,
                wanted,
            ):  # other layers or rank: start again from the base weights
                model, shape = open_model(self.path)[0], None
            if shape is None:
                base, shape = attach_adapters(model, *wanted), wanted
            model.load_weights(list(base.items()), strict=False)
            model.load_weights(list(weights.items()), strict=False)
        elif base is not None:
            model.load_weights(list(base.items()), strict=False)  # adapters off: lora_b = 0
        mx.eval(model.parameters())
        model.eval()
        self.model, self._shape, self._base = model, shape, base
        self.version, self.failed = version, None
        print(f"mlx-sdft serve: now serving adapter version {version}", file=sys.stderr, flush=True)

    # ---- what may be read as text ------------------------------------------------------

    def check_literal(self, request: ChatRequest) -> None:
        """BadRequest for a message (or tool) holding a special token's text: encoded with the rendered
        prompt it would become that control token (a forged "<|im_start|>system" turn), so it is refused."""
        for param, values in (("messages", request.messages), ("tools", request.tools or [])):
            for i, value in enumerate(values):
                if (token := special_text_in(self.tokenizer, value)) is not None:
                    raise BadRequest(
                        f"{param}[{i}] contains {token!r}, the text of one of the model's control "
                        "tokens; it is refused rather than read as that token",
                        param=param,
                    )

    def check_text(self, text: str, param: str) -> None:
        """BadRequest for a text to keep (a lesson's, a rule's) that holds a special token's text."""
        if (token := special_text_in(self.tokenizer, text)) is not None:
            raise BadRequest(
                f"{param} contains {token!r}, the text of one of the model's control tokens; it is "
                "refused rather than read as that token",
                param=param,
            )

    def check_lesson(self, lesson: dict, text: str, param: str) -> None:
        """BadRequest for a lesson (a row for the store, `text` its new text) that learn could not use:
        a special token's text in it, or a teacher prompt (the default --teacher-template, or the
        lesson's own) that leaves no room for an answer in the model's context."""
        from mlx_sdft.store.lessons import to_example

        self.check_text(text, param)
        if not self.context:
            return
        example = to_example(
            {"answer": None, "teacher_template": None, **lesson, "id": 0, "state": "new"}
        )
        size = len(encode(self.tokenizer, teacher_text(self.tokenizer, example, TEACHER_TEMPLATE)))
        if size >= self.context:
            raise BadRequest(
                f"{param}: the lesson's teacher prompt would be {size} tokens, and the model reads at "
                f"most {self.context} (max_position_embeddings); it could never be learned, so it is "
                "not stored: shorten it",
                param=param,
            )

    # ---- generation ---------------------------------------------------------------------

    def submit(self, request: ChatRequest) -> tuple[queue.Queue, threading.Event]:
        """Queue a request; its pieces (then None, or an exception) arrive on the returned queue.
        Setting the event stops the generation early (the client went away)."""
        out, cancel = queue.Queue(), threading.Event()
        self._jobs.put((request, out, cancel))
        return out, cancel

    def answer(self, request: ChatRequest) -> Iterator[Piece]:
        out, cancel = self.submit(request)
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    def _work(self) -> None:
        while True:
            request, out, cancel = self._jobs.get()
            try:
                self.refresh()
                for piece in self._generate(request):
                    if cancel.is_set():
                        break
                    out.put(piece)
                out.put(None)
            except Exception as e:  # handed to the request's thread, which answers it
                out.put(e)

    def rules(self) -> list[dict]:
        """The rules and facts to put in the prompt now (store/rules.py's `in_prompt`)."""
        if self.store is None:
            return []
        active = []
        for row in self.store.lessons(None, standing=True):
            # stored from the command line, which has no tokenizer to check it with: control-token text
            # would become real control tokens here, so such a rule stays out of the prompt (said once)
            found = special_text_in(self.tokenizer, row["text"])
            if found is None:
                active.append(row)
            elif row["id"] not in self._refused:
                self._refused.add(row["id"])
                print(
                    f"mlx-sdft serve: {row['kind']} {row['id']} contains {found!r}, a control token's text: left out "
                    f"of the prompt (mlx-sdft rules remove {row['id']})",
                    file=sys.stderr,
                    flush=True,
                )
        record = versions.record(self.home, self.version) if self.version and active else None
        return rules.in_prompt(active, self.rules_in_prompt, record)

    def _generate(self, request: ChatRequest) -> Iterator[Piece]:
        book = self.rules()
        messages = with_rules(request.messages, rules.rulebook(book), self.default_system)
        digest = rules.fingerprint(book) if book else ""
        try:
            ids = encode(self.tokenizer, render(self.tokenizer, messages, request.tools))
        except (
            Exception
        ) as e:  # the chat template refused these messages (e.g. a role it does not know)
            raise BadRequest(
                f"messages: the chat template cannot render them ({type(e).__name__}: {e})",
                param="messages",
            ) from None
        if self.context and len(ids) >= self.context:
            raise BadRequest(
                f"messages: {len(ids)} prompt tokens, and the model reads at most {self.context} "
                "(max_position_embeddings); shorten the conversation",
                param="messages",
            )
        # the answer ends where the context does (finish_reason "length"), never past the positions the model has
        max_tokens = (
            min(request.max_tokens, self.context - len(ids)) if self.context else request.max_tokens
        )
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p)
        pieces = (
            Piece(
                r.text, r.finish_reason, r.prompt_tokens, r.generation_tokens, self.version, digest
            )
            for r in stream_generate(
                self.model, self.tokenizer, ids, max_tokens=max_tokens, sampler=sampler
            )
        )
        yield from until_stop(pieces, request.stop) if request.stop else pieces


def until_stop(pieces: Iterator[Piece], stops: tuple[str, ...]) -> Iterator[Piece]:
    """The pieces up to (not including) the first stop string, which ends the answer with
    finish_reason "stop" and stops generating. Text that could still become a stop string is
    held back until it cannot, so a stream never sends part of one."""
    held = ""
    for piece in pieces:
        held += piece.text
        hits = [i for i in (held.find(s) for s in stops) if i >= 0]
        if hits or piece.finish_reason is not None:
            end, reason = (min(hits), "stop") if hits else (len(held), piece.finish_reason)
            yield Piece(
                held[:end],
                reason,
                piece.prompt_tokens,
                piece.completion_tokens,
                piece.version,
                piece.rules,
            )
            return
        keep = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        yield Piece(
            held[: len(held) - keep],
            None,
            piece.prompt_tokens,
            piece.completion_tokens,
            piece.version,
            piece.rules,
        )
        held = held[len(held) - keep :]
