"""The gate: a candidate version becomes current only when it passes every check against the
current version, measured on the same model with the two sets of adapter leaves swapped in, on
prompts no learn ever trains on (store/rules.py's held-out split) and on bundled questions.

**Lesson fit** of one-off lessons (nats per token, higher is closer to what the lesson asks):
- a lesson with a demonstration (kind demonstration, import): the mean per-token log-likelihood
  of the demonstration after the bare prompt (the student's context), measure/lessons.py;
- a lesson with a teacher context instead (feedback, hindsight): minus the mean per-token
  KL(teacher‖student) on fresh samples of the student (temperature 1, `--gate-max-tokens`,
  a seed per lesson), the teacher being the same weights shown the feedback.
The new lessons' fit on their held-out paraphrases (their prompts reworded by the model, never
trained on) is recorded beside it (`new_lessons.held_out_paraphrases`); no check reads it yet.

**Rules and facts** (standing lessons): each one's *rule gap* on the held-out prompts
(measure/rules.py: KL(the version told the rule ‖ the version untold) on its own greedy answers),
and with a check, the share of those answers that follow it; measure/version.py measures a whole
version (rules, prior answers, loops), and this module only compares two versions' numbers.

**Checks** (every one is computed and recorded; the first that fails is the reason)
1. new lessons: mean fit(candidate) − fit(current) > `--gate-min-gain`;
2. earlier lessons: mean fit change ≥ −`--gate-tolerance`;
3. new rules: each one's gap falls by more than `--gate-min-gain`, or, with a check, its compliance
   without the rule in the prompt rises by at least MIN_LIFT (what the user sees moved to the rule);
4. earlier rules: each one's gap rises by at most `--gate-rule-tolerance`;
5. drift: KL(base told the rules ‖ candidate) on the base's samples ≤ the current version's +
   `--gate-max-kl-rise` (what the user asked for is not drift: it is measured against the base
   model *with* the rules in its prompt);
6. prior answers: the share of `--gate-questions` bundled questions answered right falls by at
   most `--gate-max-prior-drop` (an update that turns "100 / 4 = 25" into 4 and one more known
   answer wrong fails here, over 32 questions), over the
   questions the base model told the rules still answers right (what the rules change, such as the
   language of an answer, is not forgetting), and fails when that leaves under MIN_COUNTED of the
   questions the current version answers right (too few to see forgetting);
7. loops: the share of held-out answers that repeat themselves rises by at most `--gate-max-loop-rise`.
"""

from __future__ import annotations

from mlx_sdft.core.teacher import Leaves, using
from mlx_sdft.machine.report import count_of
from mlx_sdft.measure import rules as measure_rules
from mlx_sdft.measure.lessons import held_out_fit, lesson_fit
from mlx_sdft.measure.version import MIN_GAP, MIN_LIFT, measure, measure_key
from mlx_sdft.store.lessons import paraphrased
from mlx_sdft.store.rules import rulebook


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# Gate 6 counts only the prior questions the rules do not change; with under this share of what the
# current version knows left, it cannot see forgetting: told "start with 'Answer:'" and "answer in
# French", Qwen2.5-0.5B missed 16 of the 24 its current version answered right, and a candidate
# accepted on the rest said, without the rules, "Leibniz developed the theory of relativity"
# (recipes/personal/README.md); told French alone it missed 11 of 25.
MIN_COUNTED = 0.5


def advice(failed: str) -> str:
    """What to try after a rejection, from the check that failed (its line starts "gate N")."""
    gate = int(failed.split()[1])
    if "too many to tell forgetting" in failed:
        return (
            "the rules stay in serve's prompt, where they apply now; at this size the model answers "
            "known questions wrongly when told them, so learning them into the weights cannot be "
            "checked for forgetting (a larger model, or fewer rules that change wording)"
        )
    if gate in (1, 3):  # nothing learned that shows on the prompts the gate measures
        change = "more --iters or a larger --learning-rate may take it further"
    else:  # something the candidate did worse than the current version
        change = "a smaller --learning-rate or fewer --iters may keep it from that"
    return (
        f"the lessons stay new: {change}, and the same options give the same result (mlx-sdft lessons "
        "delete ID drops a lesson)"
    )


def check(
    model,
    tokenizer,
    base: Leaves,
    current: Leaves,
    candidate: Leaves,
    new_rows: list[dict],
    earlier_rows: list[dict],
    standing: list[dict],
    held_out: list[list[dict]],
    cfg,
    current_measures: dict | None = None,
    say=lambda line: None,
    changed_by_rules: list[int] | None = None,
) -> dict:
    """Every number of the gate and its decision: {"passed", "failed" (one line or None), checks...}.
    `new_rows`, `earlier_rows`: one-off lessons; `standing`: every active rule and fact (state
    `new` ones are new to this version); `current_measures`: the current version's, when known;
    `changed_by_rules`: the prior questions the base model told these rules gets wrong, when known."""
    fits = {}
    if new_rows or earlier_rows:
        n = len(new_rows) + len(earlier_rows)
        say(f"gate: fit of {count_of(n, 'lesson')}, current and candidate")
        for name, leaves in (("current", current), ("candidate", candidate)):
            with using(model, leaves):
                fits[name] = lesson_fit(model, tokenizer, new_rows + earlier_rows, cfg)
    new_ids, earlier_ids = [r["id"] for r in new_rows], [r["id"] for r in earlier_rows]

    new, earlier = _fit_change(fits, new_ids), _fit_change(fits, earlier_ids)
    if held := _paraphrase_fit(model, tokenizer, current, candidate, new_rows, cfg, say):
        new["held_out_paraphrases"] = held
    new.update(threshold=cfg.gate_min_gain, passed=not new_ids or new["change"] > cfg.gate_min_gain)
    earlier.update(
        tolerance=cfg.gate_tolerance,
        passed=not earlier_ids or earlier["change"] >= -cfg.gate_tolerance,
    )
    ids = {str(r["id"]) for r in standing}
    if current_measures is None or not ids <= set(current_measures["rules"]):
        current_measures = measure(
            model,
            tokenizer,
            current,
            standing,
            held_out,
            cfg,
            say,
            what="gate, the current version",
        )
    candidate_measures = measure(
        model, tokenizer, candidate, standing, held_out, cfg, say, what="gate, the candidate"
    )
    book = rulebook(standing)
    say(
        f"gate: drift from the base model{' told the rules' if book else ''}, on {len(held_out)} held-out prompts"
    )
    kl_current, kl_candidate = measure_rules.drift(
        model,
        tokenizer,
        base,
        [current, candidate],
        held_out,
        book,
        cfg.gate_max_tokens,
        cfg.gate_batch_size,
        cfg.seed,
    )
    rules = {
        str(row["id"]): rule_check(
            row,
            current_measures["rules"][str(row["id"])],
            candidate_measures["rules"][str(row["id"])],
            cfg,
        )
        for row in standing
    }
    kl_check = {
        "current": kl_current,
        "candidate": kl_candidate,
        "max_rise": cfg.gate_max_kl_rise,
        "passed": kl_candidate <= kl_current + cfg.gate_max_kl_rise,
    }
    if changed_by_rules is None:
        changed_by_rules = _changed_by_rules(model, tokenizer, base, book, cfg, say)
    prior = _prior_check(
        current_measures["prior"]["right"],
        candidate_measures["prior"]["right"],
        changed_by_rules,
        cfg.gate_max_prior_drop,
    )
    loops = {
        "current": current_measures["loops"],
        "candidate": candidate_measures["loops"],
        "max_rise": cfg.gate_max_loop_rise,
    }
    loops["passed"] = loops["candidate"] <= loops["current"] + cfg.gate_max_loop_rise + 1e-12
    why = [
        (
            new["passed"],
            f"gate 1 (new lessons): fit changed {new['change']:+.4f} nats/token "
            f"({new['current']:.4f} -> {new['candidate']:.4f}), needs > {cfg.gate_min_gain:+.4f}",
        ),
        (
            earlier["passed"],
            f"gate 2 (earlier lessons): fit changed {earlier['change']:+.4f} nats/token "
            f"({earlier['current']:.4f} -> {earlier['candidate']:.4f}), may fall at most "
            f"{cfg.gate_tolerance:.4f}",
        ),
        *[
            (
                r["passed"],
                f"gate 3 (new rule {i}): its held-out gap did not fall by more than {cfg.gate_min_gain:.4f} "
                f"({r['current']['gap']:.4f} -> {r['candidate']['gap']:.4f} nats/token)"
                + (
                    f" and its compliance without it rose {r['candidate']['compliance'] - r['current']['compliance']:+.2f}"
                    f" ({r['current']['compliance']:.2f} -> {r['candidate']['compliance']:.2f}), "
                    f"needs +{MIN_LIFT:.2f}"
                    if "compliance" in r["candidate"]
                    else ""
                ),
            )
            for i, r in rules.items()
            if r["new"]
        ],
        *[
            (
                r["passed"],
                f"gate 4 (earlier rule {i}): its held-out gap rose {r['change']:+.4f} nats/token "
                f"({r['current']['gap']:.4f} -> {r['candidate']['gap']:.4f}), may rise at most "
                f"{cfg.gate_rule_tolerance:.4f}",
            )
            for i, r in rules.items()
            if not r["new"]
        ],
        (
            kl_check["passed"],
            f"gate 5 (drift): KL({'base told the rules' if standing else 'base'}‖candidate) "
            f"{kl_candidate:.4f} > current "
            f"{kl_current:.4f} + {cfg.gate_max_kl_rise:.4f}",
        ),
        (
            not prior["too_few"],
            f"gate 6 (prior answers): the rules change the answers to {prior['known_changed'][0]} of "
            f"the {prior['known_changed'][1]} prior questions the current version answers right (the "
            f"base model told them gets them wrong), too many to tell forgetting from what they ask",
        ),
        (
            prior["passed"],
            f"gate 6 (prior answers): {round(prior['candidate'] * prior['questions'])} of "
            f"{prior['questions']} questions right, current {round(prior['current'] * prior['questions'])}"
            f", may fall by at most {cfg.gate_max_prior_drop:.3f} of them (lost {_lost(prior['lost'], cfg)})"
            + (
                f"; {len(prior['changed_by_rules'])} questions the rules change left out"
                if prior["changed_by_rules"]
                else ""
            ),
        ),
        (
            loops["passed"],
            f"gate 7 (loops): {loops['candidate']:.3f} of held-out answers repeat themselves, current "
            f"{loops['current']:.3f} + {cfg.gate_max_loop_rise:.3f}",
        ),
    ]
    failed = next((line for ok, line in why if not ok), None)
    return {
        "passed": failed is None,
        "failed": failed,
        "advice": failed and advice(failed),
        "new_lessons": new,
        "earlier_lessons": earlier,
        "rules": rules,
        "drift_kl": kl_check,
        "prior_answers": prior,
        "loops": loops,
        "measure_key": measure_key(cfg, held_out),
        "measures": candidate_measures,
        "current_measures": current_measures,
    }


def _paraphrase_fit(
    model, tokenizer, current: Leaves, candidate: Leaves, rows: list[dict], cfg, say
) -> dict | None:
    """The new lessons' mean fit on their held-out paraphrases, current and candidate (a lesson's
    own mean over its paraphrases first); None when none has any."""
    count = sum(len(paraphrased(r, cfg.lesson_paraphrases)[1]) for r in rows)
    if not count:
        return None
    say(
        f"gate: fit of the new lessons on {count} held-out paraphrases of their prompts, current and candidate"
    )
    fits = {}
    for name, leaves in (("current", current), ("candidate", candidate)):
        with using(model, leaves):
            fits[name] = {i: _mean(v) for i, v in held_out_fit(model, tokenizer, rows, cfg).items()}
    return {**_fit_change(fits, list(fits["current"])), "prompts": count}


def _fit_change(fits: dict[str, dict[int, float]], ids: list[int]) -> dict:
    """The mean fit of the lessons `ids` under the current version and the candidate (`fits`:
    version name → lesson id → fit), its change, and each lesson's pair."""
    cur, cand = _mean(fits["current"][i] for i in ids), _mean(fits["candidate"][i] for i in ids)
    return {
        "lessons": len(ids),
        "current": cur,
        "candidate": cand,
        "change": cand - cur,
        "per_lesson": {str(i): [fits["current"][i], fits["candidate"][i]] for i in ids},
    }


def _lost(indices: list[int], cfg) -> str:
    """The questions a candidate lost, by their text (by number only with --no-log-text)."""
    if not getattr(cfg, "log_text", True):
        return f"questions {indices}"
    asked = measure_rules.prior_questions(cfg.gate_questions)
    return "; ".join(repr(asked[i]["prompt"]) for i in indices) or "no question"


HOLD_SHARE = 0.8  # a rule holds in the weights when they follow it this often, relative to told


def rule_check(row: dict, cur: dict, cand: dict, cfg) -> dict:
    """Gates 3 and 4 for one rule or fact, from the two versions' measures of it: a new one's gap
    must fall by more than --gate-min-gain or, with a check, its compliance without it in the prompt
    rise by MIN_LIFT (answers can move toward the rule while the gap rises); an earlier one's gap may
    rise by --gate-rule-tolerance."""
    fresh, change = row["state"] == "new", cand["gap"] - cur["gap"]
    lift = cand.get("compliance", 0.0) - cur.get("compliance", 0.0)
    passed = (
        change < -cfg.gate_min_gain or ("compliance" in cand and lift >= MIN_LIFT)
        if fresh
        else change <= cfg.gate_rule_tolerance
    )
    return {
        "kind": row["kind"],
        "new": fresh,
        "current": cur,
        "candidate": cand,
        "change": change,
        "passed": passed,
        "holds": holds(row, cand),
    }


def _changed_by_rules(model, tokenizer, base: Leaves, book: str | None, cfg, say) -> list[int]:
    """The prior questions the base model gets wrong when told the rules: what the rules ask for
    changes their right answer ("Always answer in French": "sept", not "seven"), so an answer that
    follows the rules there is not forgetting. None without rules."""
    if not book:
        return []
    questions = measure_rules.prior_questions(cfg.gate_questions)
    say(f"gate: the base model told the rules, on {len(questions)} prior questions")
    with using(model, base):
        told = measure_rules.prior_answers(
            model, tokenizer, questions, cfg.gate_question_tokens, cfg.gate_batch_size, rules=book
        )
    return [i for i, right in enumerate(told["right"]) if not right]


def _prior_check(
    current: list[bool], candidate: list[bool], changed: list[int], max_drop: float
) -> dict:
    """Gate 6: each version's share of the prior questions answered right, over those the rules do
    not change (`changed` left out), the ones the candidate lost, and whether it passed: a share at
    most `max_drop` lower, with at least MIN_COUNTED of the questions the current version answers
    right still counted (`too_few` otherwise: the rules change most of what it knows)."""
    left_out = set(changed)
    counted = [i for i in range(len(candidate)) if i not in left_out]
    shares = _mean(current[i] for i in counted), _mean(candidate[i] for i in counted)
    known = [i for i in range(len(current)) if current[i]]
    known_changed = [i for i in known if i in left_out]
    too_few = len(known) - len(known_changed) < MIN_COUNTED * len(known)
    return {
        "current": shares[0],
        "candidate": shares[1],
        "questions": len(counted),
        "changed_by_rules": changed,
        "known_changed": [len(known_changed), len(known)],
        "lost": [i for i in counted if current[i] and not candidate[i]],
        "max_drop": max_drop,
        "too_few": too_few,
        "passed": not too_few and shares[1] >= shares[0] - max_drop - 1e-12,
    }


def holds(row: dict, measures: dict) -> bool:
    """Whether a version follows a rule without it in the prompt: with a check, its weights-only
    compliance is at least HOLD_SHARE x the compliance told (the rule's preflight); without one,
    its gap is at most (1 - HOLD_SHARE) x the gap at the preflight."""
    pre = row.get("preflight") or {}
    if (
        row.get("check_regex") and pre.get("told") is not None
    ):  # only a rule followed when told can hold
        return (
            pre["told"] - pre["untold"] >= MIN_LIFT
            and measures.get("compliance", 0.0) >= HOLD_SHARE * pre["told"]
        )
    return pre.get("gap", 0.0) >= MIN_GAP and measures["gap"] <= (1 - HOLD_SHARE) * pre["gap"]
