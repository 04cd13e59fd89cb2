"""`mlx-sdft learn`, `rollback` and `forget`: the adapter versions in --home change only here,
one command at a time (store/versions.py's lock).

learn: the lessons in state `new` + replay of earlier learned lessons → SDFT from the current
version's adapters (jobs.train.run_train) in a candidate folder → the gate (jobs/gate.py) →
accepted: current.json points at it in one rename and its lessons become `learned`; rejected:
the folder is kept with the reason, current and the lessons' states stay as they were.

A killed run leaves only `versions/.tmp-*` (removed by the next run) and never touches
current.json; an error while building (a full disk) removes the candidate and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import mlx.core as mx

from mlx_sdft.chat_template import encode
from mlx_sdft.config import DEFAULT_MODEL, LEARN_BEFORE_THE_OPTION, LearnConfig
from mlx_sdft.core.prompts import special_text_in
from mlx_sdft.core.teacher import using
from mlx_sdft.errors import InputError, Rejected, TrainingError
from mlx_sdft.jobs.gate import check as gate_check
from mlx_sdft.machine.report import count_of
from mlx_sdft.measure import rules as measure_rules
from mlx_sdft.measure.version import (
    follows,
    measure,
    measure_key,
    preflight_key,
    stored_preflight,
    verdict,
)
from mlx_sdft.store import lessons, rules, versions
from mlx_sdft.store.db import STANDING, Store, existing_home


def _say(console, line: str) -> None:
    if console is not None:
        console.print(line, highlight=False)


def run_learn(cfg: LearnConfig, console=None) -> dict:
    """Learn the new lessons; returns the new version's record (Rejected when the gate says no)."""
    home = Path(cfg.home).expanduser()
    with versions.locked(home) as stale, Store(home) as store:
        _start(home, stale, console)
        current = versions.current(home)
        # A run killed between switching current.json and marking its lessons learned: finish that.
        store.set_state(
            [
                r["id"]
                for r in store.lessons("new")
                if r["id"] in versions.record(home, current)["includes"]
            ],
            "learned",
        )
        new = store.lessons("new")
        if not new:
            raise InputError(
                f"{home}: no new lessons to learn (add some with teach or serve; see mlx-sdft lessons)"
            )
        # no --model: the home's (its versions', else the one serve answered its exchanges with)
        home_model = versions.model_of(home, [e["model"] for e in store.exchanges(1)])
        cfg = dataclasses.replace(cfg, model=cfg.model or home_model)
        try:
            return build(home, store, cfg, current, new, "learn", console)
        except (
            InputError
        ) as e:  # a stored lesson that cannot be used: named, with the command that removes it
            raise lessons.removable(e) from None


def _start(home: Path, stale: int | None, console) -> None:
    if stale is not None:
        _say(console, f"took over the lock of pid {stale}, which did not finish (killed?)")
    for name in versions.clean_candidates(home):
        _say(console, f"removed {name}, the unfinished candidate of a run that did not finish")


def replay(pool: list[dict], new: int, ratio: float, seed: int) -> list[dict]:
    """round(ratio × new) earlier lessons drawn without replacement (all of them when fewer), by id."""
    count = min(len(pool), round(ratio * new))
    return sorted(random.Random(seed).sample(pool, count), key=lambda r: r["id"])


def _shape(home: Path, parent: int) -> dict:
    """A version continues its parent's adapters, so it keeps their type, layers and rank."""
    if not parent:
        return {}
    config = json.loads((versions.version_dir(home, parent) / "adapter_config.json").read_text())
    return {
        k: config[k] for k in ("fine_tune_type", "num_layers", "lora_parameters") if k in config
    }


def build(
    home: Path, store: Store, cfg: LearnConfig, parent: int, new: list[dict], why: str, console
) -> dict:
    """Train `new` (+ replay, + the rulebook over many prompts) from version `parent`, gate it
    against `parent`, keep it as the next version, and make it current when it passes. Call with
    the lock held."""
    from mlx_sdft.formats.checkpoint import package_versions
    from mlx_sdft.formats.models import local_source
    from mlx_sdft.jobs.train import run_train
    from mlx_sdft.opening import open_to_train

    parent_record = versions.record(home, parent)
    model = versions.located(
        cfg.model or parent_record.get("model") or versions.model_of(home) or DEFAULT_MODEL
    )
    local_source(model)  # a missing model is named before anything else is said or written
    learned = {r["id"]: r for r in store.lessons("learned")}
    one_off = [r for r in new if r["kind"] not in STANDING]
    earlier = [
        learned[i]
        for i in parent_record["includes"]
        if i in learned and learned[i]["kind"] not in STANDING
    ]
    number = versions.next_number(home)
    replayed = replay(earlier, len(one_off), cfg.replay_ratio, cfg.seed + number)
    # Every active rule and fact, new or learned: the teacher's system message in every example, and
    # distilled over many prompts, so an earlier rule is rehearsed whenever a later one is learned.
    standing = store.lessons(None, standing=True)
    book = rules.rulebook(standing)
    # A rule that shows only at an answer's end (a signature) needs samples and held-out answers that end.
    at_end = [
        r["id"] for r in standing if r["kind"] == "rule" and rules.acts_at_end(r.get("check_regex"))
    ]
    if at_end and cfg.end_rule_tokens > min(cfg.max_completion_length, cfg.gate_max_tokens):
        cfg = dataclasses.replace(
            cfg,
            max_completion_length=max(cfg.max_completion_length, cfg.end_rule_tokens),
            gate_max_tokens=max(cfg.gate_max_tokens, cfg.end_rule_tokens),
        )
        _say(
            console,
            f"rules {at_end} act at the end of an answer: samples and held-out answers of up to "
            f"{cfg.end_rule_tokens} tokens (--end-rule-tokens)",
        )
    own = rules.own_prompts(store.exchanges())
    train_prompts, held_split = rules.prompt_pool(own)
    held_out = held_split[: cfg.gate_prompts]
    fresh = tuple(r["id"] for r in standing if r["state"] == "new")
    # Preflights stored under this version of this model (rules check, rules add, an earlier learn)
    # are not measured again; when they already say that nothing new can be learned, stop before loading.
    known = {
        r["id"]: p
        for r in standing
        if r["id"] in fresh
        and (
            p := stored_preflight(
                r, parent, model, preflight_key(rules.prompts_for(r, held_out), cfg.gate_max_tokens)
            )
        )
        is not None
    }
    if not one_off and fresh and all(i in known and not follows(known[i]) for i in fresh):
        raise InputError(_unlearnable([r for r in standing if r["id"] in fresh], model, parent))
    shape = _shape(home, parent)
    folder = versions.start_candidate(home, number)
    resume = versions.version_dir(home, parent) / "adapters.safetensors" if parent else None
    started = time.time()
    try:
        train_cfg = cfg.train_config(
            model,
            f"{store.path} (lessons)",
            str(folder / "run"),
            str(resume) if resume else None,
            **shape,
        )
        # One load for everything: the model holds the current version's adapters (as the training run
        # would load them, after seeding its RNG), the measures swap leaves in and back, training continues
        # from them in place, and the gate swaps the candidate's in from the saved file.
        loaded = open_to_train(train_cfg)
        _, tokenizer, model_obj, base = loaded
        model_obj.eval()
        for row in (
            standing
        ):  # stored from the command line, unchecked: it would be control tokens in the teacher
            if (found := special_text_in(tokenizer, row["text"])) is not None:
                raise InputError(
                    f"{row['kind']} {row['id']}: contains {found!r}, a control token's text; remove it "
                    f"with mlx-sdft rules remove {row['id']}"
                )
        current = _leaves(home, parent, base)
        with using(model_obj, current):
            _questions(store, standing, model_obj, tokenizer, console, cfg.log_text)
            _paraphrases(
                store, one_off, model_obj, tokenizer, cfg.lesson_paraphrases, console, cfg.log_text
            )
            written = (
                _written_prompts(
                    [p for p in own if p in train_prompts],
                    held_split,
                    model_obj,
                    tokenizer,
                    cfg.written_prompts,
                    console,
                    cfg.log_text,
                )
                if standing
                else []
            )
        gate_cfg = dataclasses.replace(cfg, teacher_template=train_cfg.teacher_template)
        known.update(
            {
                r["id"]: p
                for r in standing
                if r["kind"] == "fact"
                and r["id"] in fresh
                and (
                    p := stored_preflight(
                        r,
                        parent,
                        model,
                        preflight_key(rules.prompts_for(r, held_out), cfg.gate_max_tokens),
                    )
                )
                is not None
            }
        )
        told = tuple(i for i in fresh if i not in known)
        measures = _measured(home, parent, measure_key(cfg, held_out))
        numbers = {
            str(i): {k: p[k] for k in ("prompts", "gap", "compliance", "told", "untold") if k in p}
            for i, p in known.items()
        }
        if measures is not None:
            measures = {**measures, "rules": {**numbers, **measures["rules"]}}
        if (
            told
            or measures is None
            or not {str(r["id"]) for r in standing} <= set(measures["rules"])
        ):
            _say(
                console,
                f"version {number}: measuring version {parent} on the held-out prompts"
                + (
                    f" (and the preflight of {count_of(len(told), 'new rule or fact', 'new rules and facts')})"
                    if told
                    else ""
                ),
            )
            found = measure(
                model_obj,
                tokenizer,
                current,
                [r for r in standing if r["id"] not in known],
                held_out,
                gate_cfg,
                lambda line: _say(console, line),
                told=told,
                prior=measures["prior"] if measures else True,  # the questions do not change
                what=f"version {parent}",
            )
            measures = {**found, "rules": {**numbers, **found["rules"]}}
        for row in standing:
            if row["id"] in fresh:
                found = measures["rules"][str(row["id"])]
                if row["id"] not in known:
                    key = preflight_key(rules.prompts_for(row, held_out), cfg.gate_max_tokens)
                    row["preflight"] = {
                        **(row.get("preflight") or {}),
                        **found,
                        "version": parent,
                        "model": model,
                        "key": key,
                    }
                    store.set_preflight(row["id"], row["preflight"])
                _say(
                    console,
                    verdict(row, found) + (" (stored preflight)" if row["id"] in known else ""),
                )
        # A rule the model does not follow when told would teach the text of answers that ignore it: left out
        # of this learn's teacher and gate, it stays new and in serve's prompt.
        refused = [
            r for r in standing if r["id"] in fresh and not follows(measures["rules"][str(r["id"])])
        ]
        if refused and not one_off and len(refused) == len(fresh):
            raise InputError(_unlearnable(refused, model, parent))
        if refused:
            one = len(refused) == 1
            _say(
                console,
                f"{_named(refused)} left out of this learn: the model does not follow "
                f"{'it' if one else 'them'} even when told "
                f"({'it stays' if one else 'they stay'} new, and in serve's prompt)",
            )
            standing = [r for r in standing if r not in refused]
            new = [r for r in new if r["id"] not in {r["id"] for r in refused}]
            book = rules.rulebook(standing)
        # A paraphrase trains on the divergence only: its teacher is shown the lesson's demonstration or
        # feedback, but the SFT term stays on the demonstration of the prompt it was written for.
        reworded = (
            [
                lessons.shown_not_taught(ex, train_cfg.teacher_template)
                for r in one_off + replayed
                for ex in lessons.paraphrased(r, cfg.lesson_paraphrases)[0]
            ]
            if train_cfg.method == "sdft"
            else []
        )
        examples = [
            dataclasses.replace(ex, teacher_system=book)
            for ex in [lessons.to_example(r) for r in one_off + replayed] + reworded
        ]
        if standing:
            drawn = random.Random(cfg.seed + number).sample(
                train_prompts, min(cfg.rule_prompts, len(train_prompts))
            ) + [[{"role": "user", "content": w}] for w in written]
            examples += rules.distillation_examples(drawn, book)
            for row in standing:
                examples += (
                    rules.distillation_examples(rules.fact_prompts(row)[0], book)
                    if row["kind"] == "fact"
                    else []
                )
        _say(
            console,
            f"version {number}: {count_of(len(one_off), 'new lesson')} + {len(replayed)} replayed"
            + (
                f" (and {count_of(len(reworded), 'paraphrase')} of their prompts)"
                if reworded
                else ""
            )
            + f", {count_of(len(standing), 'rule or fact', 'rules and facts')} over "
            f"{count_of(len(examples) - len(one_off) - len(replayed) - len(reworded), 'prompt')}, "
            f"from version {parent} ({why})",
        )
        last = run_train(train_cfg, console=console, examples={"train": examples}, loaded=loaded)
        for name in versions.ADAPTER_FILES:
            shutil.copy2(folder / "run" / name, folder / name)
        shutil.copy2(folder / "run" / "metrics.jsonl", folder / "metrics.jsonl")
        shutil.rmtree(
            folder / "run"
        )  # checkpoints and optimizer state: not needed once the version exists
        _say(console, f"version {number}: gate against version {parent}")
        candidate = {**base, **mx.load(str(folder / "adapters.safetensors"))}
        model_obj.eval()
        told_key = [model, rules.fingerprint(standing), *measure_key(gate_cfg, held_out)]
        result = gate_check(
            model_obj,
            tokenizer,
            base,
            current,
            candidate,
            one_off,
            earlier,
            standing,
            held_out,
            gate_cfg,
            measures,
            lambda line: _say(console, line),
            changed_by_rules=_told_prior(home, told_key),
        )
        result["prior_answers"]["told_key"] = told_key
        record = {
            "parent": parent,
            "created": started,
            "finished": time.time(),
            "why": why,
            "model": model,
            "method": train_cfg.method,
            "lessons": [r["id"] for r in new],
            "replayed": [r["id"] for r in replayed],
            "written_prompts": len(written),
            "includes": sorted({*parent_record["includes"], *(r["id"] for r in new)}),
            "accepted": result["passed"],
            "reason": result["failed"],
            "gate": result,
            "train": {k: v for k, v in (last or {}).items() if isinstance(v, (int, float))},
            "options": {**cfg.to_dict(), **shape, "model": model},
            "mlx_sdft": package_versions(),
        }
        versions.finish_candidate(home, folder, number, record)
    except (
        OSError
    ) as e:  # a full disk, a folder that cannot be written: nothing changed for the user
        shutil.rmtree(folder, ignore_errors=True)
        raise TrainingError(
            f"{getattr(e, 'filename', None) or folder}: {e.strerror or e}; "
            f"current version {parent} unchanged"
        ) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if not result["passed"]:
        raise Rejected(
            f"version {number} rejected by {result['failed']}; current version stays {parent}; "
            f"{result['advice']}"
        )
    versions.set_current(home, number)
    store.set_state(record["lessons"], "learned")
    _say(console, f"version {number} accepted and current (lessons {record['lessons']} learned)")
    return versions.record(home, number)


FACT_QUESTIONS = 12  # questions about a fact: about 1 in 5 held out


def _questions(
    store: Store, standing: list[dict], model, tokenizer, console, text: bool = True
) -> None:
    """The questions a new fact is distilled over and measured on (kept with the fact): those the
    model writes itself under the current version, filled up to FACT_QUESTIONS with questions built
    from the fact's words (store.rules.template_questions) when it writes fewer; the preflight
    records how many came from each."""
    for row in standing:
        if row["kind"] == "fact" and not (row.get("preflight") or {}).get("questions"):
            # One greedy answer of up to 384 tokens: minutes on a CPU, so say so first.
            _say(
                console,
                f"fact {row['id']}: the model writes questions about it (one answer of up to 384 tokens)",
            )
            written = measure_rules.write_questions(
                model, tokenizer, row["text"], FACT_QUESTIONS, 384
            )
            built = [
                q for q in rules.template_questions(row["text"], FACT_QUESTIONS) if q not in written
            ]
            questions = written + built[: FACT_QUESTIONS - len(written)]
            source = {"model": len(written), "template": len(questions) - len(written)}
            row["preflight"] = {
                **(row.get("preflight") or {}),
                "questions": questions,
                "question_source": source,
            }
            store.set_preflight(row["id"], row["preflight"])
            _say(
                console,
                f"fact {row['id']}: {len(questions)} questions about it, {source['model']} written by the "
                f"model and {source['template']} built from the fact's words"
                + (f", e.g. {questions[0]!r}" if text else ""),
            )  # --no-log-text: no text


PARAPHRASE_TOKENS = 384  # most tokens of the one answer that holds a lesson's paraphrases
PARAPHRASED_CHARS = 500  # a longer prompt (a pasted text) is not reworded line by line


def _paraphrases(
    store: Store, rows: list[dict], model, tokenizer, n: int, console, text: bool = True
) -> None:
    """Rewordings of each new one-off lesson's last user message that the model writes under the
    current version (one greedy answer), kept with the lesson; one that holds those of an earlier
    learn asked for at least n keeps them. A message of several lines or over PARAPHRASED_CHARS
    gets none: the model writes one rewording per line."""
    if not n:
        return
    for row in rows:
        kept = row.get("preflight") or {}
        if kept.get("paraphrases_asked", 0) >= n:
            _say(
                console,
                f"lesson {row['id']}: {count_of(len(kept['paraphrases'][:n]), 'paraphrase')} of its prompt, "
                f"written by an earlier learn",
            )
            continue
        last = row["prompt"][-1].get("content")
        if not _one_line(last):
            written = []
            _say(
                console,
                f"lesson {row['id']}: its prompt has several lines or over {PARAPHRASED_CHARS} characters: "
                f"it is not reworded",
            )
        else:
            budget = min(PARAPHRASE_TOKENS, n * (2 * len(encode(tokenizer, last)) + 8))
            _say(
                console,
                f"lesson {row['id']}: the model rewords its prompt (one answer of up to {budget} tokens)",
            )
            written = [
                p
                for p in measure_rules.write_paraphrases(model, tokenizer, last, n, budget)
                if special_text_in(tokenizer, p) is None
            ]
        row["preflight"] = {**kept, "paraphrases": written, "paraphrases_asked": n}
        store.set_preflight(row["id"], row["preflight"])
        train, held_out = lessons.paraphrased(row, n)
        _say(
            console,
            f"lesson {row['id']}: {count_of(len(written), 'paraphrase')} of its prompt, {len(train)} to train "
            f"on and {len(held_out)} held out"
            + (f", e.g. {written[0]!r}" if text and written else ""),
        )


def _one_line(text) -> bool:
    """A request the model can write others like, one per line of its answer: text of one line, at
    most PARAPHRASED_CHARS (a pasted text is not reworded line by line)."""
    return isinstance(text, str) and "\n" not in text.strip() and len(text) <= PARAPHRASED_CHARS


WRITTEN_FROM = 8  # the newest stored requests shown to the model as examples of their subjects


def _written_prompts(
    own: list[list[dict]], held_out: list[list[dict]], model, tokenizer, n: int, console, text: bool
) -> list[str]:
    """New requests on the subjects of the user's stored ones (their newest WRITTEN_FROM one-line
    requests, none held out) that the model writes under the current version: more prompts to
    distill the rules over. Never a held-out prompt; not kept (the version record counts them): they
    come from the user's requests, which `forget` must be able to erase."""
    if not n:
        return []
    lines = [m[-1]["content"] for m in own if _one_line(m[-1].get("content"))]
    asked = list(dict.fromkeys(lines))[:WRITTEN_FROM]
    if not asked:
        _say(
            console, "no stored one-line requests to write new ones like: --written-prompts skipped"
        )
        return []
    budget = min(PARAPHRASE_TOKENS, 32 * n)
    _say(
        console,
        f"the model writes {n} new requests like {count_of(len(asked), 'stored one')} "
        f"(one answer of up to {budget} tokens)",
    )
    written = [
        p
        for p in measure_rules.write_requests(
            model,
            tokenizer,
            asked,
            n,
            budget,
            known=[m[-1]["content"] for m in held_out if isinstance(m[-1].get("content"), str)],
        )
        if special_text_in(tokenizer, p) is None
    ]
    _say(
        console,
        f"{count_of(len(written), 'new request')} written"
        + (f", e.g. {written[0]!r}" if text and written else ""),
    )
    return written


def _measured(home: Path, version: int, key: list) -> dict | None:
    """What an earlier gate measured of `version` under the same settings: its own gate's measures
    as the candidate, else those of the newest candidate gated against it (a rejected one too)."""
    own = [versions.record(home, version)] if version else []
    siblings = [r for r in versions.records(home)[::-1] if r.get("parent") == version]
    for record, side in [(r, "measures") for r in own] + [
        (r, "current_measures") for r in siblings
    ]:
        gate_record = record.get("gate") or {}
        if gate_record.get("measure_key") == key and gate_record.get(side):
            return gate_record[side]
    return None


def _told_prior(home: Path, key: list) -> list[int] | None:
    """The prior questions the base model told the same rules got wrong, from an earlier gate under
    the same settings (a learn retried after a rejection asks it again): None when none measured it."""
    for record in versions.records(home)[::-1]:
        prior = (record.get("gate") or {}).get("prior_answers") or {}
        if prior.get("told_key") == key:
            return prior["changed_by_rules"]
    return None


def _named(rows: list[dict]) -> str:
    return ", ".join(f"{r['kind']} {r['id']}" for r in rows)


def _unlearnable(rows: list[dict], model: str, version: int) -> str:
    """Why a learn of only rules the model ignores when told is refused, and what would work."""
    them = "it" if len(rows) == 1 else "them"
    return (
        f"{_named(rows)}: {model} (version {version}) does not follow {them} even when told (see mlx-sdft "
        f"rules), so learning would train on answers that ignore {them}, and there are no other new lessons; "
        f"serve a model that follows {them} when told (a new --home with serve --model, e.g. "
        f"mlx-community/Qwen2.5-0.5B-Instruct-bf16: learn trains the model its home was served with), or give "
        f'corrected answers (mlx-sdft teach EXCHANGE --answer "...")'
    )


def _leaves(home: Path, version: int, base):
    return (
        {**base, **mx.load(str(versions.version_dir(home, version) / "adapters.safetensors"))}
        if version
        else base
    )


def run_rollback(cfg, console=None) -> list[str]:
    """Point current.json at VERSION (default: the current version's parent) after checking its
    files against their recorded sha256; lessons follow: what it includes is `learned`, the rest `new`."""
    home = Path(cfg.home).expanduser()
    with versions.locked(home) as stale, Store(home) as store:
        _start(home, stale, console)
        now = versions.current(home)
        if cfg.version is None and not now:
            raise InputError(
                f"{home}: the current version is 0 (no adapters); nothing to roll back"
            )
        target = (
            cfg.version if cfg.version is not None else versions.record(home, now)["parent"] or 0
        )
        record = versions.verify(home, target)
        versions.set_current(home, target)
        includes = set(record["includes"])
        undone = [r["id"] for r in store.lessons("learned") if r["id"] not in includes]
        store.set_state(undone, "new")
        store.set_state(sorted(includes), "learned")
    lines = [f"current version: {target} (was {now})"]
    if undone:
        lines.append(
            f"lessons {undone} are new again: learn will train on them, unless deleted (mlx-sdft lessons delete ID)"
        )
    return lines


def run_forget(cfg, console=None) -> list[str]:
    """Delete a lesson and its exchange; erase the weights of every version that learned it; when the
    current version did, go back to the newest ancestor that did not and rebuild on it the other
    lessons learned since (same options, same gate)."""
    home = Path(cfg.home).expanduser()
    with versions.locked(home) as stale, Store(home) as store:
        _start(home, stale, console)
        row = store.lesson(cfg.lesson)
        if row is None:
            raise InputError(
                f"lesson {cfg.lesson}: no such lesson in {store.path} (see mlx-sdft lessons)"
            )
        now = versions.current(home)
        # An exchange another lesson was made from stays: that lesson holds its text anyway, and
        # `teach EXCHANGE` may still need it.
        exchanges = _exchanges_of(store, row)
        others = [
            r for r in store.lessons() if r["id"] != cfg.lesson and r["exchange_id"] in exchanges
        ]
        sharing, kept = [r["id"] for r in others], {r["exchange_id"] for r in others}
        store.delete_lesson(cfg.lesson)
        store.delete_exchanges(
            [e for e in exchanges if e not in kept]
        )  # and compacts: the lesson's blanked text too
        why = f"lesson {cfg.lesson} forgotten"
        tainted = [r["version"] for r in versions.records(home) if cfg.lesson in r["includes"]]
        fresh = [
            n for n in tainted if not versions.record(home, n).get("erased")
        ]  # a second forget: erased already
        for number in fresh:
            versions.erase(home, number, why)
        done = (
            "was already deleted"
            if row["state"] == "deleted"
            else f"deleted; its exchange kept ({count_of(len(sharing), 'lesson')} {sharing} made from "
            f"it too: forget them to delete it)"
            if sharing
            else "and its exchange deleted"
            if row["exchange_id"]
            else "deleted"
        )
        lines = [
            f"{_kind(row)} {cfg.lesson} {done}; "
            + (
                f"erased the weights of versions {fresh}"
                if fresh
                else f"the weights of versions {tainted} were erased already"
                if tainted
                else "no version had learned it"
            )
        ]
        if now not in tainted:
            return lines + [f"current version {now} never learned it: unchanged"]
        chain = versions.lineage(home, now)
        base = next(v for v in chain if v not in tainted)
        versions.set_current(home, base)
        now_record, base_record = versions.record(home, now), versions.record(home, base)
        redo = [
            i
            for i in now_record["includes"]
            if i not in base_record["includes"] and i != cfg.lesson
        ]
        store.set_state(redo, "new")
        lines.append(f"current version: {base} (the newest one without lesson {cfg.lesson})")
        rows = [r for r in store.lessons("new") if r["id"] in redo]
        if not rows:
            return lines
        # The options the version was built with: those of another mlx-sdft release are its own; one
        # the record predates is what runs did then (LEARN_BEFORE_THE_OPTION), not today's default.
        known = {f.name for f in dataclasses.fields(LearnConfig)}
        options = LearnConfig(
            **{
                **LEARN_BEFORE_THE_OPTION,
                **{k: v for k, v in now_record["options"].items() if k in known},
                "home": str(home),
            }
        ).validate()
        try:
            record = build(
                home,
                store,
                options,
                base,
                rows,
                f"rebuild without lesson {cfg.lesson} (version {now}), replaying lessons {redo}",
                console,
            )
        except (Rejected, InputError, TrainingError) as e:  # what was done above stays done: say so
            raise type(e)(
                f"{lines[0]}; current version {base}, lessons {redo} new again; "
                f"the rebuild failed: {lessons.removable(e)}"
            ) from None
    return lines + [f"rebuilt lessons {redo} as version {record['version']}, now current"]


def _kind(row: dict) -> str:
    return row["kind"] if row["kind"] in STANDING else "lesson"


def _exchanges_of(store: Store, row: dict) -> list[str]:
    """The exchanges holding a lesson's text: its source, and for a hindsight lesson the request that
    continued it (the source's messages, its answer, then the follow-up)."""
    ids = [row["exchange_id"]] if row["exchange_id"] else []
    if row["kind"] == "hindsight" and row["state"] != "deleted":
        turns = [
            *row["prompt"],
            {"role": "assistant", "content": row["answer"]},
            {"role": "user", "content": row["text"]},
        ]
        want = [(m.get("role"), m.get("content")) for m in turns]
        ids += [
            e["id"]
            for e in store.exchanges()
            if [(m.get("role"), m.get("content")) for m in e["messages"]] == want
        ]
    return ids


def run_versions(cfg, console=None) -> list[str]:
    """One line per version (or the records as JSON): lineage, lessons, gate numbers, decision."""
    home = existing_home(cfg.home)
    records, now = versions.records(home), versions.current(home)
    if cfg.json:
        return [json.dumps({"current": now, "versions": records}, ensure_ascii=False, indent=1)]
    lines = [
        f"current: {now}" + ("" if records else f" (no versions in {home} yet; see mlx-sdft learn)")
    ]
    for r in records:
        lines.append(
            f"{'*' if r['version'] == now else ' '} {r['version']:>4}  parent {r['parent'] or 0:>4}  "
            f"{_state(r):<8}  {_when(r)}  lessons {r['lessons']} + replayed {len(r['replayed'])}  "
            f"{_numbers(r.get('gate'))}  {r.get('why', '')}"
            + (f"  REJECTED: {r['reason']}" if not r["accepted"] else "")
        )
    return lines


def _state(r: dict) -> str:
    return "erased" if r.get("erased") else "accepted" if r["accepted"] else "rejected"


def _when(r: dict) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if "created" in r else "-"


def _numbers(g: dict | None) -> str:
    if not g:
        return "(no gate)"
    if "drift_kl" not in g:  # a version an earlier mlx-sdft gated (canary KL and degenerate rate)
        return (
            f"new fit {g['new_lessons']['change']:+.3f}  earlier fit {g['earlier_lessons']['change']:+.3f}  "
            f"canary KL {g['canary_kl']['candidate']:.4f}"
        )
    rules = "  ".join(
        f"rule {i} gap {r['current']['gap']:.3f}->{r['candidate']['gap']:.3f}"
        for i, r in g.get("rules", {}).items()
    )
    fits = (
        f"new fit {g['new_lessons']['change']:+.3f}  earlier fit {g['earlier_lessons']['change']:+.3f}  "
        if g["new_lessons"]["lessons"] or g["earlier_lessons"]["lessons"]
        else ""
    )
    return (
        f"{fits}{rules + '  ' if rules else ''}drift KL {g['drift_kl']['candidate']:.4f}  prior "
        f"{g['prior_answers']['candidate']:.2f}  loops {g['loops']['candidate']:.2f}"
    )
