"""`mlx-sdft rules`: the standing rules and facts of --home (store/rules.py).

    rules                      list them: state, check, preflight numbers, whether the serving
                               version follows each one without it in the prompt
    rules add TEXT [--check RE] [--fact]   store one (in serve's prompt from its next request)
                               and measure at once whether the model follows it when told
    rules check [ID]           that measurement again, under the current version
    rules remove ID            delete it everywhere: the store, serve's prompt, and the weights of
                               every version that learned it (as `forget`, which rebuilds)

Each function returns the lines to print.
"""

from __future__ import annotations

import dataclasses
import json

from mlx_sdft.config import DEFAULT_MODEL, ForgetConfig, RulesConfig
from mlx_sdft.errors import InputError
from mlx_sdft.machine.report import count_of
from mlx_sdft.store import versions
from mlx_sdft.store.db import STANDING, Store
from mlx_sdft.store.rules import add_standing, counted, held, own_prompts, prompt_pool, prompts_for


def listing(cfg: RulesConfig) -> list[str]:
    with Store(cfg.home, create=False) as store:
        rows, home = store.lessons(None, standing=True), store.home
    now = versions.current(home)
    done = held(versions.record(home, now)) if now else set()
    if cfg.json:
        return [
            json.dumps(
                [{**r, "holds_in_weights": r["id"] in done} for r in rows],
                ensure_ascii=False,
                indent=1,
            )
        ]
    if not rows:
        return [f'no rules in {home} (add one: mlx-sdft rules add "Always ..." --home {cfg.home})']
    return [_line(r, r["id"] in done) for r in rows]


def _line(row: dict, holds: bool) -> str:
    state = (
        "consolidated"
        if holds
        else "in the prompt" + (", learned" if row["state"] == "learned" else "")
    )
    pre = row.get("preflight") or {}
    # the preflight's numbers (under the version it ran on): a learned rule's are in `versions`
    parts = [f"told {pre['told']:.2f} / untold {pre['untold']:.2f}"] if "told" in pre else []
    parts += [f"gap {pre['gap']:.3f}"] if "gap" in pre else []
    numbers = "preflight: " + ", ".join(parts) if parts else "not measured"
    check = f"  check {row['check_regex']}" if row.get("check_regex") else ""
    return f"{row['id']:>5}  {row['kind']:<5} {state:<22} {row['text']!r}{check}  ({numbers})"


def add(cfg: RulesConfig, console=None) -> list[str]:

    if cfg.text is None:
        raise InputError('TEXT: give the rule, e.g. mlx-sdft rules add "Always answer in French."')
    if cfg.preflight and cfg.model:  # refused before the rule is stored
        from mlx_sdft.formats.models import local_source

        local_source(cfg.model)
    with Store(cfg.home) as store:
        lesson, lines = add_standing(store, "fact" if cfg.fact else "rule", cfg.text, cfg.check)
    if not cfg.preflight:
        return lines
    return lines + check(dataclasses.replace(cfg, rule=lesson), console)


def check(cfg: RulesConfig, console=None) -> list[str]:
    """The preflight (measure/version.py) of one rule or all, under the current version; kept in the store."""
    import mlx.core as mx

    from mlx_sdft.machine.report import make_console
    from mlx_sdft.measure.version import preflight, preflight_key, verdict
    from mlx_sdft.opening import open_model_for

    with Store(cfg.home, create=False) as store:
        home = store.home
        rows = [r for r in store.lessons(None, standing=True) if cfg.rule in (None, r["id"])]
        if cfg.rule is not None and not rows:
            raise InputError(
                f"rule {cfg.rule}: no such rule or fact in {store.path} (see mlx-sdft rules)"
            )
        if not rows:
            raise InputError(f"{store.path}: no rules to check (add one with mlx-sdft rules add)")
        exchanges = store.exchanges()
        now = versions.current(home)
        model = versions.located(
            cfg.model or versions.model_of(home, [e["model"] for e in exchanges]) or DEFAULT_MODEL
        )
        held_out = prompt_pool(own_prompts(exchanges))[1][: cfg.gate_prompts]
        console = console or make_console()
        loaded, tokenizer, _ = open_model_for(
            dataclasses.replace(cfg, model=model),
            console=console,
            adapters=versions.version_dir(home, now) if now else None,
        )
        mx.eval(loaded.parameters())
        loaded.eval()
        console.print(
            f"preflight of {counted(rows)} with {model} (version {now}) on "
            f"{count_of(len(held_out), 'held-out prompt')}, {cfg.gate_max_tokens} tokens each",
            highlight=False,
        )
        results = preflight(
            loaded,
            tokenizer,
            rows,
            held_out,
            cfg,
            lambda line: console.print(line, highlight=False),
        )
        lines = []
        for row in rows:
            # what learn reuses when it learns this rule from this version of this model (and a fact's questions)
            key = preflight_key(prompts_for(row, held_out), cfg.gate_max_tokens)
            store.set_preflight(
                row["id"],
                {
                    **(row.get("preflight") or {}),
                    **results[row["id"]],
                    "version": now,
                    "model": model,
                    "key": key,
                },
            )
            lines.append(verdict(row, results[row["id"]]))
    return lines


def _standing(cfg: RulesConfig) -> dict:
    """The rule or fact RULE names, or InputError."""
    if cfg.rule is None:
        raise InputError("RULE: give the rule's id (see mlx-sdft rules)")
    with Store(cfg.home, create=False) as store:
        row = store.lesson(cfg.rule)
    if row is None or row["kind"] not in STANDING or row["state"] == "deleted":
        raise InputError(
            f"rule {cfg.rule}: no such rule or fact in {cfg.home} (see mlx-sdft rules)"
        )
    return row


def removal_question(cfg: RulesConfig) -> tuple[str, str]:
    """What `rules remove` asks (after checking RULE exists: no question about nothing), and the
    line a "no" ends with. The question names what happens to the versions that learned it, as
    `forget` does it: the current one is rebuilt without it, the weights of the others erased."""
    row = _standing(cfg)
    learned = [
        r["version"]
        for r in versions.records(cfg.home)
        if row["id"] in r["includes"] and not r.get("erased")
    ]
    if versions.current(cfg.home) in learned:
        then = " (the current version learned it: it is rebuilt without it)"
    elif learned:
        then = (
            f" (version{'s' * (len(learned) > 1)} {', '.join(map(str, learned))} learned it: "
            f"{'its' if len(learned) == 1 else 'their'} weights are erased)"
        )
    else:
        then = ""
    return (
        f"Remove {row['kind']} {row['id']} ({row['text'][:60]!r}) everywhere{then}?",
        f"{row['kind']} {row['id']} kept: nothing removed",
    )


def remove(cfg: RulesConfig, console=None) -> list[str]:
    from mlx_sdft.jobs.learn import run_forget

    _standing(cfg)
    return run_forget(ForgetConfig(lesson=cfg.rule, home=cfg.home).validate(), console)
