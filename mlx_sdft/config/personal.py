"""The options of personal adaptation: `serve`, `teach`, `lessons`, `learn`, `versions`, `rollback`,
`forget` (one store and its adapter versions under --home)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mlx_sdft.config.options import (
    ACCESS,
    ANSWERS,
    ChatTemplate,
    DEFAULT_HOME,
    DEFAULT_MODEL,
    Dequantize,
    FEEDBACK_TEMPLATE,
    GATE,
    HINDSIGHT_TEMPLATE,
    LEARN,
    LESSONS,
    MEASURE,
    ModelSource,
    RULES,
    _check_groups,
    _opt,
    _positive,
    _regexes,
    _template,
    check_regex,
    compose,
)
from mlx_sdft.config.train import Config
from mlx_sdft.errors import InputError
from mlx_sdft.yaml_file import read_yaml


# The held-out measurement of rules (learn's gate and `rules check`): 24 prompts (a rule's share is
# then resolved to 1/24), answers of 48 tokens (a format shows in its first words), 8 at once.
GATE_PROMPTS, GATE_MAX_TOKENS, GATE_BATCH_SIZE = 24, 48, 8


def _home():
    return _opt(
        DEFAULT_HOME,
        "Folder of the personal store (store.db) and the adapter versions (versions/, current.json).",
    )


def _feedback_template():
    return _opt(
        FEEDBACK_TEMPLATE,
        "Teacher prompt of feedback lessons (/v1/feedback, teach --feedback): a string or "
        "a file, with {question}, {answer} and {feedback}.",
        group=LESSONS,
    )


def _redact():
    return _opt(
        [],
        "Mask what this regular expression matches before anything is stored (repeatable).",
        group=LESSONS,
    )


@dataclass
class ServeConfig(Dequantize, ChatTemplate, ModelSource):
    """`mlx-sdft serve`: an OpenAI-compatible server that keeps every exchange in --home."""

    home: str = _home()
    host: str = _opt(
        "127.0.0.1", "Address to listen on; any but this machine's loopback requires --api-key."
    )
    port: int = _opt(8080, "Port to listen on (0: a free one, printed at start).")
    api_key: str | None = _opt(
        None, "Require the header `Authorization: Bearer KEY` on every request.", group=ACCESS
    )
    allowed_host: list = _opt(
        [],
        "Also answer requests whose Host header names this host, e.g. a reverse proxy's "
        "name (repeatable; * allows any). Without it only 127.0.0.1, localhost, ::1 and "
        "--host are answered.",
        group=ACCESS,
    )
    allowed_origin: list = _opt(
        [],
        "Also answer requests from web pages of this origin, e.g. http://localhost:3000 "
        "(repeatable; * allows any). A request with any other Origin header gets 403.",
        group=ACCESS,
    )
    max_queue: int = _opt(
        8,
        "Most requests waiting behind the one being generated; one more gets 503 with "
        "Retry-After (0: only one request at a time).",
        group=ANSWERS,
    )
    max_tokens: int = _opt(
        512, "Most tokens per answer when a request does not say.", group=ANSWERS
    )
    temperature: float = _opt(
        0.7, "Sampling temperature when a request does not say (0: greedy).", group=ANSWERS
    )
    top_p: float = _opt(1.0, "Nucleus sampling mass when a request does not say.", group=ANSWERS)
    hindsight: bool = _opt(
        False,
        "When a request continues an earlier exchange, store the user's follow-up as a "
        "hindsight lesson on that exchange.",
        group=LESSONS,
    )
    hindsight_template: str = _opt(
        HINDSIGHT_TEMPLATE,
        "Teacher prompt of hindsight lessons: a string or a file, "
        "with {question}, {answer} and {followup}.",
        group=LESSONS,
    )
    feedback_template: str = _feedback_template()
    redact: list = _redact()
    rules_in_prompt: str = _opt(
        "always",
        "Put the active rules and facts in every request's system message: always, "
        "never, or auto (those the serving version does not yet follow without them).",
        ("always", "auto", "never"),
    )
    learn_every: int = _opt(
        0,
        "Run `mlx-sdft learn` in the background whenever this many new lessons have arrived "
        "(0: never); the server answers from the current version meanwhile.",
        group=LEARN,
    )
    learn_config: str | None = _opt(
        None, "YAML file of learn options for --learn-every.", path=True, group=LEARN
    )

    def validate(self) -> ServeConfig:
        _check_groups(self)
        _positive(self, ("max_tokens",))
        if self.learn_every < 0:
            raise InputError(f"--learn-every: must be >= 0, got {self.learn_every}")
        if self.learn_config is not None:
            self.learn_config = str(Path(self.learn_config).resolve())
            read_yaml(self.learn_config, LearnConfig)
        if self.max_queue < 0:
            raise InputError(f"--max-queue: must be >= 0, got {self.max_queue}")
        for host in self.allowed_host:
            if not host.strip() or any(c in host for c in "/ @"):
                raise InputError(
                    f"--allowed-host: {host!r} is not a host name or address (no scheme or path)"
                )
        for origin in self.allowed_origin:
            if origin != "*" and not _is_origin(origin):
                raise InputError(
                    f"--allowed-origin: {origin!r} is not an origin (SCHEME://HOST[:PORT], e.g. "
                    "http://localhost:3000) or *"
                )
        if not 0 <= self.port < 65536:
            raise InputError(f"--port: must be in [0, 65535], got {self.port}")
        if self.host not in LOOPBACK and not self.api_key:
            raise InputError(
                f"--api-key: required to listen on {self.host!r} (only {', '.join(LOOPBACK)} may go without)"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError(
                "--temperature: must be >= 0"
                if self.temperature < 0
                else "--top-p: must be in (0, 1]"
            )
        _template(self, "hindsight_template", ("question", "answer", "followup"))
        _template(self, "feedback_template", ("question", "answer", "feedback"))
        _regexes(self.redact)
        return self


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _within_bundled(cfg, names: tuple[str, ...]) -> None:
    """--gate-prompts and --gate-questions count bundled prompts: more than there are would be cut
    silently, and the record would say more was measured than was."""
    from mlx_sdft.config.bundled import prior_questions, prompt_pool

    available = {
        "gate_prompts": (len(prompt_pool()[1]), "the bundled held-out prompts"),
        "gate_questions": (len(prior_questions(10**6)), "the bundled questions"),
    }
    for name in names:
        most, what = available[name]
        if getattr(cfg, name) > most:
            raise InputError(
                f"--{name.replace('_', '-')}: at most {most} ({what}), got {getattr(cfg, name)}"
            )


def _is_origin(text: str) -> bool:
    """SCHEME://HOST[:PORT] and nothing more, as a browser sends it in the Origin header."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  raises on a bad port
    except ValueError:
        return False
    return bool(parts.scheme and parts.hostname) and not (
        parts.path.strip("/") or parts.query or parts.fragment or parts.username
    )


@dataclass
class TeachConfig:
    """`mlx-sdft teach`: list the stored exchanges and turn one into a lesson."""

    exchange: str | None = _opt(
        None,
        "The exchange to correct: its id (the completion id; see mlx-sdft exchanges list).",
        argument=True,
    )
    home: str = _home()
    list: bool = _opt(False, "List the stored exchanges, newest first.")
    limit: int = _opt(20, "How many exchanges to list.")
    answer: str | None = _opt(None, "The answer you wanted: a demonstration lesson.")
    feedback: str | None = _opt(
        None, "What was wrong with the answer, in words: a feedback lesson."
    )
    always: bool = _opt(
        False,
        "With --feedback: it holds for every answer, not this one only (a standing rule).",
        group=RULES,
    )
    rule: str | None = _opt(
        None,
        "A standing rule for every answer, e.g. \"Always end with '- Sam'\" (as `rules add`).",
        group=RULES,
    )
    fact: str | None = _opt(
        None,
        'A fact the model should know, e.g. "Middlemarch was written by George Eliot".',
        group=RULES,
    )
    check: str | None = _opt(
        None,
        "With --rule, --fact or --always: a regular expression an answer that follows "
        "it matches (measures compliance).",
        group=RULES,
    )
    import_file: str | None = _opt(
        None,
        "Add every example of a .jsonl file (the formats `train` reads) as lessons.",
        flag="--import",
    )
    forget_exchanges: bool = _opt(
        False, "Delete every stored exchange (lessons stay) and compact the store.", group=LESSONS
    )
    yes: bool = _opt(False, "Delete without asking.", group=LESSONS)
    feedback_template: str = _feedback_template()
    redact: list = _redact()

    def validate(self) -> TeachConfig:
        if not self.exchange and (self.answer is not None or self.feedback is not None):
            raise InputError(
                "--answer/--feedback: name the exchange they correct (see mlx-sdft exchanges list)"
            )
        actions = [
            name
            for name, on in (
                ("--list", self.list),
                ("EXCHANGE", self.exchange),
                ("--import", self.import_file),
                ("--forget-exchanges", self.forget_exchanges),
                ("--rule", self.rule is not None),
                ("--fact", self.fact is not None),
            )
            if on
        ]
        if len(actions) != 1:
            raise InputError(
                "give one of EXCHANGE (with --answer or --feedback), --rule or --fact"
                + (
                    f", not several (got {', '.join(actions)})"
                    if actions
                    else " (mlx-sdft exchanges list shows the exchanges; lessons import FILE adds a file)"
                )
            )
        if self.always and self.feedback is None:
            raise InputError(
                "--always: goes with EXCHANGE --feedback TEXT (a standing rule from a correction)"
            )
        if self.check is not None and self.rule is None and self.fact is None and not self.always:
            raise InputError("--check: goes with --rule, --fact or --feedback ... --always")
        if self.exchange and (self.answer is None) == (self.feedback is None):
            raise InputError(
                f"{self.exchange}: give only one of --answer, --feedback"
                if self.answer is not None
                else f"{self.exchange}: give --answer or --feedback"
            )
        for name in ("answer", "feedback", "rule", "fact"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise InputError(f"--{name}: must not be blank")
        check_regex(self.check, "--check")
        _positive(self, ("limit",))
        _template(self, "feedback_template", ("question", "answer", "feedback"))
        _regexes(self.redact)
        return self


@dataclass
class RulesConfig:
    """`mlx-sdft rules`: the standing rules and facts in --home: list, add, check, remove."""

    text: str | None = _opt(
        None, "The rule or fact, e.g. \"Always end your answer with '- Sam'\".", argument=True
    )
    rule: int | None = _opt(None, "The rule's id (see mlx-sdft rules).", argument=True)
    home: str = _home()
    json: bool = _opt(False, "Print the rules as JSON.")
    fact: bool = _opt(False, "TEXT is a fact to know, not a rule to follow.")
    check: str | None = _opt(
        None, "A regular expression an answer that follows the rule (or knows the fact) matches."
    )
    preflight: bool = _opt(
        True,
        "Measure at once whether the model follows the rule when told (loads it).",
        group=MEASURE,
    )
    model: str | None = _opt(
        None,
        "The model to measure with [default: the one the home's versions or exchanges "
        f"name; else {DEFAULT_MODEL}].",
        path=True,
        group=MEASURE,
    )
    gate_prompts: int = _opt(
        GATE_PROMPTS,
        "Held-out prompts the preflight answers (as learn's --gate-prompts).",
        group=MEASURE,
    )
    gate_max_tokens: int = _opt(
        GATE_MAX_TOKENS, "Tokens per answer (as learn's --gate-max-tokens).", group=MEASURE
    )
    gate_batch_size: int = _opt(
        GATE_BATCH_SIZE, "Prompts answered at once (as learn's --gate-batch-size).", group=MEASURE
    )
    yes: bool = _opt(False, "Remove without asking.")

    def validate(self) -> RulesConfig:
        _positive(self, ("gate_prompts", "gate_max_tokens", "gate_batch_size"))
        _within_bundled(self, ("gate_prompts",))
        if self.text is not None and not self.text.strip():
            raise InputError("TEXT: must not be blank")
        check_regex(self.check, "--check")
        return self


@dataclass
class LessonsConfig:
    """`mlx-sdft lessons`: what the model will learn from, and deleting it."""

    lesson: int | None = _opt(None, "The lesson's id.", argument=True)
    home: str = _home()
    json: bool = _opt(False, "Print the lessons as JSON.")
    state: str | None = _opt(
        None,
        "Only lessons in this state (without it: all but deleted).",
        ("new", "learned", "deleted"),
    )
    export: str | None = _opt(
        None, "Write the lessons as .jsonl for `mlx-sdft train --data` instead of listing them."
    )
    force: bool = _opt(False, "Replace FILE (the export) if it exists.")
    yes: bool = _opt(False, "Purge without asking.")

    def validate(self) -> LessonsConfig:
        if self.state is not None and self.state not in ("new", "learned", "deleted"):
            raise InputError(f"--state: {self.state!r} is not one of new, learned, deleted")
        return self


# ---- personal adaptation, part 2: learn, versions, rollback, forget ----


# The one line of `learn --help` (and docs/options.md) about the train options it shows none of.
LEARN_TAKES_TRAIN = (
    "Every `mlx-sdft train` option is accepted too (see `mlx-sdft train --help`), with train's "
    "defaults except those above; learn sets the data and adapter paths itself."
)


# learn's own training defaults (the rest are train's): a visible change in one learn on a laptop,
# recipes/personal. Every block adapted (attention-only or partial LoRA learns less from little
# data: "LoRA without regret"); 5x train's rate for a few steps (at 1e-4 x 16 steps Qwen2.5-0.5B took
# a rule in fully but lost prior answers and looped: recipes/personal); samples of a rule lesson are
# kept when cut at their budget, since every one of their tokens carries the rule's signal; 64 tokens
# per sample, the most a rule that acts at its answer's end is given (docs/personal.md).
LEARN_DEFAULTS = {
    "learning_rate": 5e-5,
    "iters": 12,
    "num_layers": -1,
    "max_completion_length": 64,
    "truncated": "keep",
}
# train's options learn sets itself: the lessons are its data, every candidate a new folder.
LEARN_SETS = ("data", "adapter_path", "resume_adapter_file", "resume", "dry_run", "overwrite")


@dataclass
class LearnConfig(compose(Config, LEARN_DEFAULTS, LEARN_SETS, "learn")):
    """`mlx-sdft learn`: the new lessons in --home plus replay -> a candidate version -> the gate.
    Every `train` option applies, with train's defaults but LEARN_DEFAULTS, except LEARN_SETS."""

    model: str | None = _opt(
        None,
        "The base model (as for serve) [default: the model the current version was "
        "trained from; without a version, the one serve answered the newest exchange with; "
        f"else {DEFAULT_MODEL}].",
        path=True,
    )
    home: str = _home()
    # Replay: Chaudhry et al. 2019 ("tiny episodic memories") mix memory and new data 1:1 in every
    # batch; with a handful of personal lessons that is as many earlier lessons as new ones.
    replay_ratio: float = _opt(
        1.0,
        "Earlier learned lessons replayed per new lesson (drawn at random; all of them "
        "when there are fewer).",
    )
    gate_min_gain: float = _opt(
        0.0,
        "Gates 1 and 3, new lessons and rules: the candidate's lesson fit (nats/token, "
        "higher is closer) must beat the current version's, and each new rule's held-out gap "
        "must fall below it, by more than this.",
        group=GATE,
    )
    gate_tolerance: float = _opt(
        0.05,
        "Gate 2, earlier lessons: the candidate's lesson fit may fall below the "
        "current version's by at most this (nats/token).",
        group=GATE,
    )
    gate_rule_tolerance: float = _opt(
        0.05,
        "Gate 4, earlier rules: each one's held-out gap may rise by at most this (nats/token).",
        group=GATE,
    )
    # 0.1: recipes/retention-small measured KL 0.12-0.16 after 24 SDFT steps at lr 1e-4 on SmolLM2-135M,
    # and recipes/personal's first run saw a useful 12-step update (new-lesson fit +0.39) at 0.054.
    gate_max_kl_rise: float = _opt(
        0.1,
        "Gate 5, drift: KL(base told the rules‖candidate) on the held-out prompts may "
        "exceed the current version's by at most this (nats/token).",
        group=GATE,
    )
    gate_max_prior_drop: float = _opt(
        0.05,
        "Gate 6, prior answers: the share of bundled questions answered right may "
        "fall by at most this.",
        group=GATE,
    )
    gate_max_loop_rise: float = _opt(
        0.1,
        "Gate 7, loops: the share of held-out answers that repeat themselves may "
        "rise by at most this.",
        group=GATE,
    )
    gate_prompts: int = _opt(
        GATE_PROMPTS,
        "Held-out prompts (a split no learn trains on) the gate and the rule preflight answer.",
        group=GATE,
    )
    gate_max_tokens: int = _opt(
        GATE_MAX_TOKENS,
        "Tokens per held-out answer and per fresh sample of a feedback lesson.",
        group=GATE,
    )
    gate_questions: int = _opt(
        32, "Bundled questions with checkable answers in the prior-answers check.", group=GATE
    )
    gate_question_tokens: int = _opt(32, "Tokens per answer to those questions.", group=GATE)
    gate_batch_size: int = _opt(
        GATE_BATCH_SIZE,
        "Prompts answered at once in the gate and the preflight (decoding is "
        "memory-bound: a larger batch costs little more per step).",
        group=GATE,
    )
    rule_prompts: int = _opt(
        64,
        "Prompts (the bundled ones and your stored requests, never the held-out ones) each "
        "learn draws for distilling the rules and facts; they join the lessons in one training "
        "set, of which --iters x --batch-size examples are trained on.",
    )
    # 128: told a signature rule, Qwen2.5-0.5B ended 21 of 32 bundled prompts' answers within 128 tokens
    # and no more within 256; 8 ran past 512 (recipes/personal/README.md, answer_lengths.py).
    end_rule_tokens: int = _opt(
        128,
        "Most tokens per sample and per held-out answer, instead of "
        "--max-completion-length and --gate-max-tokens when they are fewer, while a rule's "
        "check matches only at an answer's end (ends with $, e.g. a signature): such a rule "
        "shows only in a whole answer.",
    )
    # 8: about 6 to train on and 2 held out (one in 5 by hash, at least one), in one greedy answer of
    # a few hundred tokens at most per lesson.
    # Off by default: Qwen2.5-Coder-0.5B and SmolLM2-135M mostly repeat a request or ask another (docs/personal.md)
    lesson_paraphrases: int = _opt(
        0,
        "Rewordings of each new one-off lesson's prompt that the model writes (kept "
        "with the lesson): trained on with the lesson's teacher context, except about 1 in "
        "5 held out for the gate (0: each lesson trains on its own prompt only; a model "
        "that rewords requests well is needed, see docs/personal.md).",
        before_the_option=0,
    )
    # Off by default: asked for 10, Qwen2.5-Coder-0.5B copied out the 6 requests it was shown before
    # writing 4 of its own (docs/personal.md).
    written_prompts: int = _opt(
        0,
        "New requests on the subjects of your stored ones that the model writes before training "
        "(one greedy answer): the rules and facts are distilled over them too, besides "
        "--rule-prompts (0: none; a model that writes good questions is needed, see "
        "docs/personal.md).",
        before_the_option=0,
    )

    def validate(self) -> LearnConfig:
        _positive(
            self,
            (
                "gate_prompts",
                "gate_max_tokens",
                "gate_questions",
                "gate_question_tokens",
                "gate_batch_size",
                "rule_prompts",
                "end_rule_tokens",
            ),
        )
        for name in ("lesson_paraphrases", "written_prompts"):
            if not 0 <= getattr(self, name) <= MAX_WRITTEN:
                raise InputError(
                    f"--{name.replace('_', '-')}: must be in [0, {MAX_WRITTEN}], got {getattr(self, name)}"
                )
        for name in (
            "replay_ratio",
            "gate_tolerance",
            "gate_rule_tolerance",
            "gate_max_kl_rise",
            "gate_max_prior_drop",
            "gate_max_loop_rise",
        ):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise InputError(
                    f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}"
                )
        for name in ("gate_max_prior_drop", "gate_max_loop_rise"):  # shares: 1 switches it off
            if getattr(self, name) > 1:
                raise InputError(
                    f"--{name.replace('_', '-')}: a share of answers, at most 1 (1 lets any "
                    f"change pass), got {getattr(self, name)}"
                )
        _within_bundled(self, ("gate_prompts", "gate_questions"))
        if not math.isfinite(self.gate_min_gain):
            raise InputError(f"--gate-min-gain: must be finite, got {self.gate_min_gain}")
        checked = self.train_config(
            self.model or "-", "-", "-"
        )  # the train options, before anything loads
        self.teacher_template, self.chat_template = checked.teacher_template, checked.chat_template
        return self

    def train_config(
        self,
        model: str,
        data: str,
        adapter_path: str,
        resume_adapter_file: str | None = None,
        **shape,
    ) -> Config:
        """The `train` options of this run, with learn's paths (and the current version's adapter shape)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(Config)}
        values.update(
            model=model,
            data=data,
            adapter_path=adapter_path,
            resume_adapter_file=resume_adapter_file,
            resume=False,
            dry_run=False,
            **shape,
        )
        return Config(**values).validate()


MAX_WRITTEN = 32  # prompts one greedy answer holds
# What a version recorded before one of learn's options existed was built with: forget rebuilds it so.
LEARN_BEFORE_THE_OPTION = {
    f.name: f.metadata["before_the_option"]
    for f in dataclasses.fields(LearnConfig)
    if "before_the_option" in f.metadata
}


@dataclass
class VersionsConfig:
    """`mlx-sdft versions [list]`: the lineage of adapter versions in --home."""

    home: str = _home()
    json: bool = _opt(False, "Print the version records as JSON.")

    def validate(self) -> VersionsConfig:
        return self


@dataclass
class RollbackConfig:
    """`mlx-sdft versions rollback`: point current.json back at an accepted version."""

    version: int | None = _opt(
        None,
        "The version to serve (0: no adapters) [default: the current version's parent].",
        argument=True,
    )
    home: str = _home()

    def validate(self) -> RollbackConfig:
        if self.version is not None and self.version < 0:
            raise InputError(f"VERSION: must be >= 0, got {self.version}")
        return self


@dataclass
class ForgetConfig:
    """`mlx-sdft forget`: delete a lesson and rebuild the current version without it."""

    lesson: int | None = _opt(None, "The lesson's id (see mlx-sdft lessons).", argument=True)
    home: str = _home()

    def validate(self) -> ForgetConfig:
        if self.lesson is None:
            raise InputError("LESSON-ID: required (see mlx-sdft lessons)")
        return self
