"""One version's numbers on the held-out prompts (store/rules.py's split), with its adapter leaves
swapped in: each rule's and fact's gap and compliance, prior answers and loops (measure/rules.py),
what the gate of `learn` compares between the current version and a candidate; and the rule
preflight, how the model follows each rule told, with its verdict in one line (`rules add`,
`rules check` and `learn` print it)."""

from __future__ import annotations

import hashlib
import json

from mlx_sdft.core.teacher import Leaves, using
from mlx_sdft.machine.report import ProgressLines
from mlx_sdft.measure import rules as measure_rules
from mlx_sdft.store.rules import prompts_for, rulebook


def measure(
    model,
    tokenizer,
    leaves: Leaves,
    standing: list[dict],
    held_out: list[list[dict]],
    cfg,
    say=lambda line: None,
    told: tuple = (),
    prior: bool | dict = True,
    what: str = "measuring",
) -> dict:
    """One version's rule gaps and compliance (for the ids in `told`, also told: the preflight),
    prior answers (`prior`: measure them, skip them, or these, already measured) and loop rate."""
    questions = measure_rules.prior_questions(cfg.gate_questions) if prior is True else []
    planned = (
        len(held_out)
        + len(questions)
        + sum(
            len(prompts_for(r, held_out))
            * ((r["kind"] == "fact") + (r["id"] in told and bool(r.get("check_regex"))))
            for r in standing
        )
    )
    advance = ProgressLines(say, what, planned)
    with using(model, leaves):
        answers = measure_rules.greedy(
            model, tokenizer, held_out, cfg.gate_max_tokens, cfg.gate_batch_size, advance
        )
        rules = {
            str(row["id"]): _standing(
                model, tokenizer, row, held_out, answers, cfg, row["id"] in told, advance
            )
            for row in standing
        }
        if prior is True:
            prior = measure_rules.prior_answers(
                model, tokenizer, questions, cfg.gate_question_tokens, cfg.gate_batch_size, advance
            )
        elif prior is False:  # the preflight: rules only
            prior = {"accuracy": None, "right": []}
    return {"rules": rules, "prior": prior, "loops": measure_rules.loop_rate(tokenizer, answers)}


def _standing(
    model, tokenizer, row: dict, held_out, answers, cfg, told: bool = False, advance=None
) -> dict:
    """A rule's or fact's gap (and compliance) on its held-out prompts; with `told`, also the
    compliance of answers told it (the preflight)."""
    prompts = prompts_for(row, held_out)
    if prompts is not held_out:  # a fact: its own questions
        answers = measure_rules.greedy(
            model, tokenizer, prompts, cfg.gate_max_tokens, cfg.gate_batch_size, advance
        )
    book = rulebook([row])
    out = {
        "prompts": len(prompts),
        "gap": measure_rules.rule_gap(
            model, tokenizer, prompts, answers, book, cfg.gate_batch_size
        ),
    }
    if row.get("check_regex"):
        out["compliance"] = measure_rules.compliance(row["check_regex"], answers.texts)
        if told:
            told_answers = measure_rules.greedy(
                model,
                tokenizer,
                measure_rules.told(tokenizer, prompts, book),
                cfg.gate_max_tokens,
                cfg.gate_batch_size,
                advance,
            )
            out.update(
                told=measure_rules.compliance(row["check_regex"], told_answers.texts),
                untold=out["compliance"],
            )
    return out


def measure_key(cfg, held_out: list[list[dict]]) -> list:
    """What a version's measures depend on besides its weights and rules: equal keys, reusable numbers."""
    return [
        len(held_out),
        hashlib.sha256(json.dumps(held_out).encode()).hexdigest()[:12],
        cfg.gate_max_tokens,
        cfg.gate_questions,
        cfg.gate_question_tokens,
        cfg.gate_batch_size,
        cfg.seed,
    ]


# A rule the model follows when told changes its answers: with a check, told compliance at least
# MIN_LIFT above untold (Qwen2.5-0.5B answered in French in 0.46 of answers told, 0.00 untold);
# without one, a gap of at least MIN_GAP nats/token (SmolLM2-135M's ignored rule: 0.023).
MIN_LIFT, MIN_GAP = 0.2, 0.05


def preflight(
    model, tokenizer, rows: list[dict], held_out: list[list[dict]], cfg, say=lambda line: None
) -> dict:
    """Rule id → how the model under its present leaves follows each rule told, on the held-out
    prompts: the rule gap and, with a check, the compliance told and untold."""
    found = measure(
        model,
        tokenizer,
        None,
        rows,
        held_out,
        cfg,
        say,
        told=tuple(r["id"] for r in rows),
        prior=False,
        what="preflight",
    )
    return {row["id"]: found["rules"][str(row["id"])] for row in rows}


def follows(result: dict) -> bool:
    """Whether the preflight found the model following the rule when told (MIN_LIFT, MIN_GAP)."""
    return (
        result["told"] - result["untold"] >= MIN_LIFT
        if "told" in result
        else result["gap"] >= MIN_GAP
    )


def preflight_key(prompts: list[list[dict]], max_tokens: int) -> list:
    """What a rule's preflight numbers depend on besides the model and its version: the held-out
    prompts it answered and their length."""
    return [len(prompts), hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:12], max_tokens]


def stored_preflight(row: dict, version: int, model: str, key: list) -> dict | None:
    """The preflight stored with a rule (by `rules check`, `rules add` or an earlier learn) when it
    was measured under this version of this model on these prompts, else None: measuring it again
    would give the same numbers."""
    pre = row.get("preflight") or {}
    same = pre.get("version") == version and pre.get("model") == model and pre.get("key") == key
    return pre if same and key[0] and "gap" in pre else None


def verdict(row: dict, result: dict) -> str:
    """One line: what the preflight says about learning this rule at this model size."""
    s = "s" * (result["prompts"] != 1)
    numbers = (
        f"told {result['told']:.2f} vs untold {result['untold']:.2f} of {result['prompts']} held-out "
        f"answer{s} follow its check, gap {result['gap']:.3f} nats/token"
        if "told" in result
        else f"gap {result['gap']:.3f} nats/token on {result['prompts']} held-out prompt{s}; no --check"
    )
    if follows(result):
        return f"{row['kind']} {row['id']}: the model follows it when told ({numbers}); learn can distill it"
    return (
        f"{row['kind']} {row['id']}: the model does not follow it even when told ({numbers}): learning it is "
        f"unlikely at this size; a larger model that follows it in context (e.g. Qwen2.5-0.5B-Instruct or "
        f"bigger), or corrected answers (teach EX --answer), would work better"
    )
