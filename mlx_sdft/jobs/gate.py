"""The gate: a candidate version becomes current only when it passes three checks against the
current version, measured on the same model with the two sets of adapter leaves swapped in.

**Lesson fit** (nats per token, higher is closer to what the lesson asks):
- a lesson with a demonstration (kind demonstration, import): the mean per-token log-likelihood
  of the demonstration after the bare prompt (the student's context), `check.demonstration_loglik`.
  SDFT's loss is on the student's own samples, never on the demonstration's tokens, so this is
  not the quantity the update optimised (with `--method sft` it is: the record says which);
- a lesson with a teacher context instead (feedback, hindsight): minus the mean per-token
  KL(teacher‖student) on fresh samples of the student (temperature 1, `--gate-max-tokens`,
  a seed per lesson), the teacher being the same weights shown the feedback: a model that has
  taken the feedback in answers the bare prompt as it would with the feedback in view.

**Checks**
1. new lessons: mean fit(candidate) − fit(current) > `--gate-min-gain` (default 0: it moved toward them);
2. earlier lessons (those the current version learned): mean fit change ≥ −`--gate-tolerance`;
3. canary on the first `--gate-prompts` bundled general prompts: KL(base‖candidate) ≤
   KL(base‖current) + `--gate-max-kl-rise` (jobs.evaluate.retention_kl, same seed, so the same
   base samples), and the degenerate rate of greedy answers (core/degeneration.py) ≤ the current
   version's + `--gate-max-degenerate-rise`.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_sdft.core.losses import kl_of_logits
from mlx_sdft.core.prompts import encode_examples
from mlx_sdft.core.rollout import sample
from mlx_sdft.core.scoring import completion_logits, completion_mask
from mlx_sdft.core.teacher import Leaves, using
from mlx_sdft.jobs.check import demonstration_loglik
from mlx_sdft.jobs.evaluate import general_answers, load_prompts, retention_kl
from mlx_sdft.store.lessons import to_example


def feedback_fit(model, pairs, stops: list[int], max_tokens: int, temperature: float, seed: int) -> list[float]:
    """−mean per-token KL(teacher‖student) on one fresh student sample per prompt (seed + i)."""
    out = []
    for i, pair in enumerate(pairs):  # one at a time: teacher prompts differ in length
        rollout = sample(model, [pair.student_ids], [max_tokens], stops, temperature=temperature, batch_size=1,
                         seeds=[seed + i])
        completion = rollout.completions[0]
        student_BTV = completion_logits(model, [pair.student_ids], [completion]) / temperature
        teacher_BTV = completion_logits(model, [pair.teacher_ids], [completion]) / temperature
        mask_BT = completion_mask([len(completion)])
        kl_BT = kl_of_logits(teacher_BTV, student_BTV)[0]
        out.append(-((kl_BT * mask_BT).sum() / mask_BT.sum()).item())
    return out


def lesson_fit(model, tokenizer, rows: list[dict], cfg) -> dict[int, float]:
    """Lesson id → fit (module docstring) under the model's present leaves."""
    examples = [to_example(r) for r in rows]
    pairs = encode_examples(tokenizer, examples, cfg.teacher_template, cfg.max_seq_length)
    demo = [i for i, ex in enumerate(examples) if ex.demonstration]
    context = [i for i, ex in enumerate(examples) if not ex.demonstration]
    fits = {}
    if demo:
        values = demonstration_loglik(model, [pairs[i] for i in demo], "student", cfg.batch_size)
        fits.update({rows[i]["id"]: v for i, v in zip(demo, values)})
    if context:
        values = feedback_fit(model, [pairs[i] for i in context], sorted(tokenizer.eos_token_ids),
                              cfg.gate_max_tokens, 1.0, cfg.seed)
        fits.update({rows[i]["id"]: v for i, v in zip(context, values)})
    return fits


def canary(model, tokenizer, base: Leaves, cfg) -> dict:
    """KL(base‖model) and the degenerate rate of greedy answers on the general prompts."""
    prompts = load_prompts(None, cfg.gate_prompts)
    mx.random.seed(cfg.seed)  # the same base samples for every version compared
    kl_value = retention_kl(model, tokenizer, base, prompts, cfg.gate_max_tokens, cfg.batch_size)
    rows = general_answers(model, tokenizer, prompts, cfg.gate_max_tokens, cfg.batch_size)
    return {"kl": kl_value, "degenerate_rate": sum(r["degenerate"] for r in rows) / max(len(rows), 1)}


def canary_key(cfg) -> list:
    """What the canary numbers depend on besides the weights: equal keys, reusable numbers."""
    return [cfg.gate_prompts, cfg.gate_max_tokens, cfg.seed, cfg.batch_size]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def check(model, tokenizer, base: Leaves, current: Leaves, candidate: Leaves, new_rows: list[dict],
          earlier_rows: list[dict], cfg, current_canary: dict | None = None) -> dict:
    """Every number of the gate and its decision: {"passed", "failed" (one line or None), checks...}.
    `current_canary`: the current version's canary numbers when already known (same canary_key)."""
    fits = {}
    for name, leaves in (("current", current), ("candidate", candidate)):
        with using(model, leaves):
            fits[name] = lesson_fit(model, tokenizer, new_rows + earlier_rows, cfg)
    new_ids, earlier_ids = [r["id"] for r in new_rows], [r["id"] for r in earlier_rows]

    def lessons(ids):
        cur, cand = _mean(fits["current"][i] for i in ids), _mean(fits["candidate"][i] for i in ids)
        return {"lessons": len(ids), "current": cur, "candidate": cand, "change": cand - cur,
                "per_lesson": {str(i): [fits["current"][i], fits["candidate"][i]] for i in ids}}

    new, earlier = lessons(new_ids), lessons(earlier_ids)
    new.update(threshold=cfg.gate_min_gain, passed=new["change"] > cfg.gate_min_gain)
    earlier.update(tolerance=cfg.gate_tolerance, passed=not earlier_ids or earlier["change"] >= -cfg.gate_tolerance)
    if current_canary is None:
        with using(model, current):
            current_canary = canary(model, tokenizer, base, cfg)
    with using(model, candidate):
        candidate_canary = canary(model, tokenizer, base, cfg)
    kl_check = {"current": current_canary["kl"], "candidate": candidate_canary["kl"], "max_rise": cfg.gate_max_kl_rise}
    kl_check["passed"] = kl_check["candidate"] <= kl_check["current"] + cfg.gate_max_kl_rise
    deg = {"current": current_canary["degenerate_rate"], "candidate": candidate_canary["degenerate_rate"],
           "max_rise": cfg.gate_max_degenerate_rise}
    deg["passed"] = deg["candidate"] <= deg["current"] + cfg.gate_max_degenerate_rise + 1e-12
    why = [
        (new["passed"], f"gate 1 (new lessons): fit changed {new['change']:+.4f} nats/token "
                        f"({new['current']:.4f} -> {new['candidate']:.4f}), needs > {cfg.gate_min_gain:+.4f}"),
        (earlier["passed"], f"gate 2 (earlier lessons): fit changed {earlier['change']:+.4f} nats/token "
                            f"({earlier['current']:.4f} -> {earlier['candidate']:.4f}), may fall at most "
                            f"{cfg.gate_tolerance:.4f}"),
        (kl_check["passed"], f"gate 3 (canary KL): KL(base‖candidate) {kl_check['candidate']:.4f} > "
                             f"KL(base‖current) {kl_check['current']:.4f} + {cfg.gate_max_kl_rise:.4f}"),
        (deg["passed"], f"gate 3 (canary degenerate rate): {deg['candidate']:.3f} > current {deg['current']:.3f} + "
                        f"{cfg.gate_max_degenerate_rise:.3f}"),
    ]
    failed = next((line for ok, line in why if not ok), None)
    return {"passed": failed is None, "failed": failed, "new_lessons": new, "earlier_lessons": earlier,
            "canary_kl": kl_check, "canary_degenerate_rate": deg, "canary_key": canary_key(cfg),
            "canary": candidate_canary}
