"""The gate: a candidate version becomes current only when it passes every check against the
current version, measured on the same model with the two sets of adapter leaves swapped in, on
prompts no learn ever trains on (store/rules.py's held-out split) and on bundled questions.

**Lesson fit** of one-off lessons (nats per token, higher is closer to what the lesson asks):
- a lesson with a demonstration (kind demonstration, import): the mean per-token log-likelihood
  of the demonstration after the bare prompt (the student's context), measure/lessons.py;
- a lesson with a teacher context instead (feedback, hindsight): minus the mean per-token
  KL(teacher‖student) on fresh samples of the student (temperature 1, `--gate-max-tokens`,
  a seed per lesson), the teacher being the same weights shown the feedback.

**Rules and facts** (standing lessons): each one's *rule gap* on the held-out prompts
(measure/rules.py: KL(the version told the rule ‖ the version untold) on its own greedy answers),
and with a check, the share of those answers that follow it.

**Checks** (every one is computed and recorded; the first that fails is the reason)
1. new lessons: mean fit(candidate) − fit(current) > `--gate-min-gain`;
2. earlier lessons: mean fit change ≥ −`--gate-tolerance`;
3. new rules: each one's gap falls by more than `--gate-min-gain`;
4. earlier rules: each one's gap rises by at most `--gate-rule-tolerance`;
5. drift: KL(base told the rules ‖ candidate) on the base's samples ≤ the current version's +
   `--gate-max-kl-rise` (what the user asked for is not drift: it is measured against the base
   model *with* the rules in its prompt);
6. prior answers: the share of `--gate-questions` bundled questions answered right falls by at
   most `--gate-max-prior-drop` (an update that turns "100 / 4 = 25" into 4 fails here);
7. loops: the share of held-out answers that repeat themselves rises by at most `--gate-max-loop-rise`.
"""

from __future__ import annotations

import hashlib
import json
import time

from mlx_sdft.core.teacher import Leaves, using
from mlx_sdft.measure import rules as measure_rules
from mlx_sdft.measure.lessons import lesson_fit
from mlx_sdft.store.rules import prompts_for, rulebook


class Progress:
    """Answers done of those planned, with the time so far and an estimate of the rest: one line at
    most every `every` seconds (plain lines, so a log file shows them too)."""

    def __init__(self, say, what: str, total: int, every: float = 30.0):
        self.say, self.what, self.total, self.every = say, what, max(total, 1), every
        self.done, self.started = 0, time.time()
        self.shown = self.started

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.shown >= self.every or self.done >= self.total:
            self.shown = now
            left = (now - self.started) / max(self.done, 1) * max(self.total - self.done, 0)
            self.say(f"{self.what}: {self.done}/{self.total} answers, {now - self.started:.0f} s, about {left:.0f} s left")


def measure(model, tokenizer, leaves: Leaves, standing: list[dict], held_out: list[list[dict]], cfg,
            say=lambda line: None, told: tuple = (), prior: bool | dict = True, what: str = "measuring") -> dict:
    """One version's rule gaps and compliance (for the ids in `told`, also told: the preflight),
    prior answers (`prior`: measure them, skip them, or these, already measured) and loop rate."""
    questions = measure_rules.prior_questions(cfg.gate_questions) if prior is True else []
    planned = len(held_out) + len(questions) + sum(
        len(prompts_for(r, held_out)) * ((r["kind"] == "fact") + (r["id"] in told and bool(r.get("check_regex"))))
        for r in standing)
    advance = Progress(say, what, planned)
    with using(model, leaves):
        answers = measure_rules.greedy(model, tokenizer, held_out, cfg.gate_max_tokens, cfg.gate_batch_size, advance)
        rules = {str(row["id"]): _standing(model, tokenizer, row, held_out, answers, cfg, row["id"] in told, advance)
                 for row in standing}
        if prior is True:
            prior = measure_rules.prior_answers(model, tokenizer, questions, cfg.gate_question_tokens,
                                                cfg.gate_batch_size, advance)
        elif prior is False:  # the preflight: rules only
            prior = {"accuracy": None, "right": []}
    return {"rules": rules, "prior": prior, "loops": measure_rules.loop_rate(tokenizer, answers)}


def _standing(model, tokenizer, row: dict, held_out, answers, cfg, told: bool = False, advance=None) -> dict:
    """A rule's or fact's gap (and compliance) on its held-out prompts; with `told`, also the
    compliance of answers told it (the preflight)."""
    prompts = prompts_for(row, held_out)
    if prompts is not held_out:  # a fact: its own questions
        answers = measure_rules.greedy(model, tokenizer, prompts, cfg.gate_max_tokens, cfg.gate_batch_size, advance)
    book = rulebook([row])
    out = {"prompts": len(prompts), "gap": measure_rules.rule_gap(model, tokenizer, prompts, answers, book,
                                                                  cfg.gate_batch_size)}
    if row.get("check_regex"):
        out["compliance"] = measure_rules.compliance(row["check_regex"], answers.texts)
        if told:
            told_answers = measure_rules.greedy(model, tokenizer, measure_rules.told(tokenizer, prompts, book),
                                                cfg.gate_max_tokens, cfg.gate_batch_size, advance)
            out.update(told=measure_rules.compliance(row["check_regex"], told_answers.texts), untold=out["compliance"])
    return out


def measure_key(cfg, held_out: list[list[dict]]) -> list:
    """What a version's measures depend on besides its weights and rules: equal keys, reusable numbers."""
    return [len(held_out), hashlib.sha256(json.dumps(held_out).encode()).hexdigest()[:12], cfg.gate_max_tokens,
            cfg.gate_questions, cfg.gate_question_tokens, cfg.gate_batch_size, cfg.seed]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def check(model, tokenizer, base: Leaves, current: Leaves, candidate: Leaves, new_rows: list[dict],
          earlier_rows: list[dict], standing: list[dict], held_out: list[list[dict]], cfg,
          current_measures: dict | None = None, say=lambda line: None) -> dict:
    """Every number of the gate and its decision: {"passed", "failed" (one line or None), checks...}.
    `new_rows`, `earlier_rows`: one-off lessons; `standing`: every active rule and fact (state
    `new` ones are new to this version); `current_measures`: the current version's, when known."""
    fits = {}
    if new_rows or earlier_rows:
        say(f"gate: fit of {len(new_rows) + len(earlier_rows)} lessons, current and candidate")
        for name, leaves in (("current", current), ("candidate", candidate)):
            with using(model, leaves):
                fits[name] = lesson_fit(model, tokenizer, new_rows + earlier_rows, cfg)
    new_ids, earlier_ids = [r["id"] for r in new_rows], [r["id"] for r in earlier_rows]

    def lessons(ids):
        cur, cand = _mean(fits["current"][i] for i in ids), _mean(fits["candidate"][i] for i in ids)
        return {"lessons": len(ids), "current": cur, "candidate": cand, "change": cand - cur,
                "per_lesson": {str(i): [fits["current"][i], fits["candidate"][i]] for i in ids}}

    new, earlier = lessons(new_ids), lessons(earlier_ids)
    new.update(threshold=cfg.gate_min_gain, passed=not new_ids or new["change"] > cfg.gate_min_gain)
    earlier.update(tolerance=cfg.gate_tolerance, passed=not earlier_ids or earlier["change"] >= -cfg.gate_tolerance)
    ids = {str(r["id"]) for r in standing}
    if current_measures is None or not ids <= set(current_measures["rules"]):
        current_measures = measure(model, tokenizer, current, standing, held_out, cfg, say,
                                   what="gate, the current version")
    candidate_measures = measure(model, tokenizer, candidate, standing, held_out, cfg, say, what="gate, the candidate")
    say(f"gate: drift from the base model told the rules, on {len(held_out)} held-out prompts")
    book = rulebook(standing)
    kl_current, kl_candidate = measure_rules.drift(model, tokenizer, base, [current, candidate], held_out, book,
                                                   cfg.gate_max_tokens, cfg.gate_batch_size, cfg.seed)
    rules = {}
    for row in standing:
        key = str(row["id"])
        cur, cand = current_measures["rules"][key], candidate_measures["rules"][key]
        fresh = row["state"] == "new"
        rule = {"kind": row["kind"], "new": fresh, "current": cur, "candidate": cand,
                "change": cand["gap"] - cur["gap"]}
        rule["passed"] = rule["change"] < -cfg.gate_min_gain if fresh else rule["change"] <= cfg.gate_rule_tolerance
        rule["holds"] = holds(row, cand)
        rules[key] = rule
    kl_check = {"current": kl_current, "candidate": kl_candidate, "max_rise": cfg.gate_max_kl_rise,
                "passed": kl_candidate <= kl_current + cfg.gate_max_kl_rise}
    prior = {"current": current_measures["prior"]["accuracy"], "candidate": candidate_measures["prior"]["accuracy"],
             "questions": len(candidate_measures["prior"]["right"]), "max_drop": cfg.gate_max_prior_drop,
             "lost": [i for i, (a, b) in enumerate(zip(current_measures["prior"]["right"],
                                                       candidate_measures["prior"]["right"])) if a and not b]}
    prior["passed"] = prior["candidate"] >= prior["current"] - cfg.gate_max_prior_drop - 1e-12
    loops = {"current": current_measures["loops"], "candidate": candidate_measures["loops"],
             "max_rise": cfg.gate_max_loop_rise}
    loops["passed"] = loops["candidate"] <= loops["current"] + cfg.gate_max_loop_rise + 1e-12
    why = [
        (new["passed"], f"gate 1 (new lessons): fit changed {new['change']:+.4f} nats/token "
                        f"({new['current']:.4f} -> {new['candidate']:.4f}), needs > {cfg.gate_min_gain:+.4f}"),
        (earlier["passed"], f"gate 2 (earlier lessons): fit changed {earlier['change']:+.4f} nats/token "
                            f"({earlier['current']:.4f} -> {earlier['candidate']:.4f}), may fall at most "
                            f"{cfg.gate_tolerance:.4f}"),
        *[(r["passed"], f"gate 3 (new rule {i}): its held-out gap did not fall by more than {cfg.gate_min_gain:.4f} "
                        f"({r['current']['gap']:.4f} -> {r['candidate']['gap']:.4f} nats/token)")
          for i, r in rules.items() if r["new"]],
        *[(r["passed"], f"gate 4 (earlier rule {i}): its held-out gap rose {r['change']:+.4f} nats/token "
                        f"({r['current']['gap']:.4f} -> {r['candidate']['gap']:.4f}), may rise at most "
                        f"{cfg.gate_rule_tolerance:.4f}") for i, r in rules.items() if not r["new"]],
        (kl_check["passed"], f"gate 5 (drift): KL(base told the rules‖candidate) {kl_candidate:.4f} > current "
                             f"{kl_current:.4f} + {cfg.gate_max_kl_rise:.4f}"),
        (prior["passed"], f"gate 6 (prior answers): {round(prior['candidate'] * prior['questions'])} of "
                          f"{prior['questions']} questions right, current {round(prior['current'] * prior['questions'])}"
                          f", may fall by at most {cfg.gate_max_prior_drop:.3f} of them (lost questions {prior['lost']})"),
        (loops["passed"], f"gate 7 (loops): {loops['candidate']:.3f} of held-out answers repeat themselves, current "
                          f"{loops['current']:.3f} + {cfg.gate_max_loop_rise:.3f}"),
    ]
    failed = next((line for ok, line in why if not ok), None)
    return {"passed": failed is None, "failed": failed, "new_lessons": new, "earlier_lessons": earlier,
            "rules": rules, "drift_kl": kl_check, "prior_answers": prior, "loops": loops,
            "measure_key": measure_key(cfg, held_out), "measures": candidate_measures,
            "current_measures": current_measures}


HOLD_SHARE = 0.8  # a rule holds in the weights when they follow it this often, relative to told


def holds(row: dict, measures: dict) -> bool:
    """Whether a version follows a rule without it in the prompt: with a check, its weights-only
    compliance is at least HOLD_SHARE x the compliance told (the rule's preflight); without one,
    its gap is at most (1 - HOLD_SHARE) x the gap at the preflight."""
    pre = row.get("preflight") or {}
    if row.get("check_regex") and pre.get("told") is not None:  # only a rule followed when told can hold
        return pre["told"] - pre["untold"] >= MIN_LIFT and measures.get("compliance", 0.0) >= HOLD_SHARE * pre["told"]
    return pre.get("gap", 0.0) >= MIN_GAP and measures["gap"] <= (1 - HOLD_SHARE) * pre["gap"]


# A rule the model follows when told changes its answers: with a check, told compliance at least
# MIN_LIFT above untold (Qwen2.5-0.5B answered in French in 0.46 of answers told, 0.00 untold);
# without one, a gap of at least MIN_GAP nats/token (SmolLM2-135M's ignored rule: 0.023).
MIN_LIFT, MIN_GAP = 0.2, 0.05


def preflight(model, tokenizer, rows: list[dict], held_out: list[list[dict]], cfg, say=lambda line: None) -> dict:
    """Rule id → how the model under its present leaves follows each rule told, on the held-out
    prompts: the rule gap and, with a check, the compliance told and untold."""
    found = measure(model, tokenizer, None, rows, held_out, cfg, say, told=tuple(r["id"] for r in rows), prior=False,
                    what="preflight")
    return {row["id"]: found["rules"][str(row["id"])] for row in rows}


def verdict(row: dict, result: dict) -> str:
    """One line: what the preflight says about learning this rule at this model size."""
    numbers = (f"told {result['told']:.2f} vs untold {result['untold']:.2f} of {result['prompts']} held-out answers "
               f"follow its check, gap {result['gap']:.3f} nats/token" if "told" in result
               else f"gap {result['gap']:.3f} nats/token on {result['prompts']} held-out prompts (no --check)")
    follows = result["told"] - result["untold"] >= MIN_LIFT if "told" in result else result["gap"] >= MIN_GAP
    if follows:
        return f"{row['kind']} {row['id']}: the model follows it when told ({numbers}); learn can distill it"
    return (f"{row['kind']} {row['id']}: the model does not follow it even when told ({numbers}): learning it is "
            f"unlikely at this size; a larger model that follows it in context (e.g. Qwen2.5-0.5B-Instruct or "
            f"bigger), or corrected answers (teach EX --answer), would work better")
