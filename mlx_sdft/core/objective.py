"""What a micro-batch is scored by, chosen once per run.

SDFT: the teacher's scores of the sampled completions (no gradient) and the student's loss
against them, as one `Objective` of the three ways to hold the scores: the full vocabulary,
the teacher's top-K buckets (--topk: its [B, T, V] logits need not stay through the student's
backward pass), or final hidden states turned into logits a chunk at a time (--logits-chunk).
SFT: `supervised_loss`, cross-entropy on the demonstrations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_map

from mlx_sdft.config import PAPER_SDFT
from mlx_sdft.core import guards, prefix
from mlx_sdft.core.losses import (
    sdft_loss,
    sdft_loss_chunked,
    sdft_loss_topk,
    sft_loss,
    teacher_topk,
)
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.scoring import completion_logits, completion_mask, lm_head, pad_rows


@dataclass(frozen=True)
class ObjectiveArgs:
    """The options the loss reads, named and defaulted as the options themselves (config/train.py);
    `of` takes them from train's Config, as mlx-lm's lora.py builds its TrainingArgs."""

    method: str  # sdft, or sft: cross-entropy on the demonstrations
    divergence: str
    beta: float
    temperature: float
    skip_first_tokens: int
    truncated: str
    sft_weight: float
    base_kl_weight: float
    num_generations: int
    max_seq_length: int
    topk: int | None
    logits_chunk: int
    grad_checkpoint: bool

    @classmethod
    def of(cls, options) -> ObjectiveArgs:
        """The options' fields of these names (train's Config, or a command's that extends it)."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Objective:
    """The two halves of the SDFT loss, for one way of holding the teacher's scores.

    teacher_scores(model, pairs, completions) → scores, from the teacher contexts, no gradient
        (run it with the teacher's leaves in place: `teacher.using`);
    student_loss(model, pairs, completions, scores, guard=None, shares=None, log=0) → (loss, ntoks, parts,
        own_N), from the student contexts, differentiable in the student's weights (`loss` only: the rest
        are auxiliary outputs); with a `guards.Guard`, the guards' terms too (--truncated, --sft-weight,
        --base-kl-weight), and `scores` are of the guard's `rows` only (`scored_rows`). `parts` holds the
        loss's unweighted terms as scalars: `sdft_loss` always, `sft_loss` with --sft-weight (0 for a
        batch without a demonstration), `base_kl` with --base-kl-weight, so that loss = sdft_loss +
        λ sft_loss + μ base_kl. `shares` ({part: float}, from `term_counts`) multiplies each term in
        `loss` by this micro-batch's share of the optimizer step; none: each term whole. `own_N`: the
        first `log` completions' own SDFT losses (--log-completions), each over its own tokens as if
        it were not masked (0 for one with no token past --skip-first-tokens).
    """

    teacher_scores: Callable
    student_loss: Callable


def scored_rows(
    completions: list[list[int]], truncated: list[bool], args: ObjectiveArgs, log: int = 0
) -> list[int]:
    """The completions the teacher, the base model and the student's divergence pass score: those with a
    token in the SDFT or the base-KL term (longer than --skip-first-tokens, or than 0 with
    --base-kl-weight, and not masked by --truncated mask; `truncated` as `guards.maskable` gives it),
    and of the first `log` those with a token of their own loss to log. Any other would add 0 to the
    terms' sums (the terms still divide by every completion)."""
    skip, masked = (0 if args.base_kl_weight else args.skip_first_tokens), args.truncated == "mask"
    return [
        i
        for i, (c, t) in enumerate(zip(completions, truncated, strict=True))
        if (len(c) > skip and not (masked and t)) or (i < log and len(c) > args.skip_first_tokens)
    ]


def one_row(scores_BT, j: int, length: int):
    """Row j of [B, T, ...] arrays (one, or a tuple such as the top-K buckets), cut to `length` positions."""
    return tree_map(lambda a: a[j : j + 1, :length], scores_BT)


def sdft_objective(args: ObjectiveArgs) -> Objective:
    """Full vocabulary, --topk buckets or --logits-chunk hidden states (both: buckets taken
    chunk by chunk); logits are divided by --temperature; the loss is --divergence. Each prompt
    is run once for all its continuations (`prefix`): the teacher's for its --num-generations
    completions, the student's for those and its demonstration (the SFT term). Only the guard's
    `rows` are scored (`scored_rows`); the SFT term covers every prompt's demonstration."""
    options = dict(divergence=args.divergence, skip=args.skip_first_tokens, beta=args.beta)
    share = (
        not args.grad_checkpoint
    )  # mx.checkpoint cannot carry the shared prompt's cache through a block

    def scaled(logits_BTV: mx.array) -> mx.array:
        # Divide by the temperature in float32: in bf16 the division itself would round.
        return logits_BTV.astype(mx.float32) / args.temperature

    def student_pass(model, pairs, rows, completions, guard, hidden=False):
        """The student's scaled logits of the completions of `rows` (hidden states with `hidden`; None
        for no row) and the SFT term → (scores, (sft, sft_ntoks)), (None, 0) for no term, from one pass
        over the student prompts. The SFT term is over the distinct prompts of `pairs` that have a
        demonstration (a feedback lesson has none)."""
        with_sft = guard is not None and args.sft_weight
        demonstrated = (
            [p for p in pairs[:: args.num_generations] if p.demonstrated] if with_sft else []
        )
        targets = demonstrations(demonstrated, args)
        ours, demo = prefix.grouped(
            model,
            [
                ([pairs[i].student_ids for i in rows], completions),
                ([p.student_ids for p in demonstrated], targets),
            ],
            hidden,
            share,
        )
        sft = (
            (None, 0)
            if demo is None
            else sft_term(lm_head(model)(demo) if hidden else demo, targets)
        )
        return (ours if hidden or ours is None else scaled(ours)), sft

    def teacher_hidden(model, pairs, completions):
        return mx.stop_gradient(
            prefix.completion_hidden(model, [p.teacher_ids for p in pairs], completions)
        )

    def teacher_logits(
        model, pairs, completions
    ):  # kept unscaled: in the model's dtype, half of float32
        return mx.stop_gradient(
            prefix.grouped(model, [([p.teacher_ids for p in pairs], completions)])[0]
        )

    def loss_of(divergence, hidden=False):
        """Objective.student_loss for one way of holding the teacher's scores: `divergence(model, student,
        scores, mask_BT)` → (loss, ntoks), the SDFT term over the rows it is given."""

        def student_loss(model, pairs, completions, scores, guard=None, shares=None, log=0):
            rows = (
                list(range(len(completions))) if guard is None or guard.rows is None else guard.rows
            )
            kept, with_base_kl = (
                [completions[i] for i in rows],
                guard is not None and args.base_kl_weight,
            )
            student, sft = student_pass(model, pairs, rows, kept, guard, hidden)
            sdft, base_kl = (
                (mx.array(0.0), mx.array(0, dtype=mx.int32)),
                mx.array(0.0),
            )  # no row scored: terms of 0
            if rows:
                mask_BT = completion_mask([len(c) for c in kept])
                if guard is not None:
                    mask_BT = guards.keep_rows(
                        mask_BT, [guard.truncated[i] for i in rows], args.truncated
                    )
                # A mean over every completion: the rows left out add 0 to its sum, not to its count.
                over_all = len(rows) / len(completions)
                loss, ntoks = divergence(model, student, scores, mask_BT)
                sdft = (loss * over_all, ntoks)
                if with_base_kl:
                    base_kl = (
                        guards.base_kl_loss(student, scaled(guard.base_logits), mask_BT) * over_all
                    )
            return (
                *regularized(sdft, sft, guard, base_kl if with_base_kl else None, shares),
                own_losses(model, divergence, student, scores, rows, completions, log),
            )

        return student_loss

    def own_losses(model, divergence, student, scores, rows, completions, log):
        """The first `log` completions' own SDFT losses → own_N, each from its row of the pass's scores
        alone, every token of it counted past --skip-first-tokens (masked or not), as a batch of one gives."""
        place, own = {i: j for j, i in enumerate(rows)}, []
        for i, c in enumerate(completions[:log]):
            if (
                len(c) <= args.skip_first_tokens
            ):  # no token of its own loss: 0, as a batch of one gives
                own.append(mx.array(0.0))
                continue
            j, n = place[i], len(c)
            own.append(
                divergence(model, one_row(student, j, n), one_row(scores, j, n), mx.ones((1, n)))[0]
            )
        return mx.stack(own) if own else mx.zeros((0,))

    def regularized(loss_and_ntoks, sft_and_ntoks, guard, base_kl=None, shares=None):
        """The guards' terms added to the SDFT loss → (loss, ntoks, parts); the base-KL term is
        `student_loss`'s, the SFT term `student_pass`'s. With `shares`, each term of `loss` times its
        share of the step (`parts` stay whole)."""
        (loss, ntoks), (sft, sft_ntoks) = loss_and_ntoks, sft_and_ntoks
        share = (
            (lambda name, term: term)
            if shares is None
            # noqa: E731
            else (lambda name, term: None if term is None else term * shares[name])
        )
        if guard is None:
            return share("sdft_loss", loss), ntoks, {"sdft_loss": loss}
        parts = {
            "sdft_loss": loss,
            **({"sft_loss": mx.array(0.0) if sft is None else sft} if args.sft_weight else {}),
            **({} if base_kl is None else {"base_kl": base_kl}),
        }
        # The SFT term's demonstration tokens are trained on too: a step whose completions were all
        # masked still trains through them, and is not an empty one.
        return (
            guards.regularized_loss(
                share("sdft_loss", loss),
                sft=share("sft_loss", sft),
                base_kl=share("base_kl", base_kl),
                sft_weight=0.0 if sft is None else args.sft_weight,
                base_kl_weight=args.base_kl_weight,
            ),
            ntoks + sft_ntoks,
            parts,
        )

    if args.topk:

        def buckets(model, pairs, completions):
            if not args.logits_chunk:
                return teacher_topk(scaled(teacher_logits(model, pairs, completions)), args.topk)
            hidden_BTD, head, C = (
                teacher_hidden(model, pairs, completions),
                lm_head(model),
                args.logits_chunk,
            )
            chunks = [
                teacher_topk(scaled(head(hidden_BTD[:, t : t + C])), args.topk)
                for t in range(0, hidden_BTD.shape[1], C)
            ]
            return tuple(mx.concatenate(parts, axis=1) for parts in zip(*chunks))

        def topk_divergence(model, logits_BTV, scores, mask_BT):
            idx_BTK, buckets_BTK1 = scores
            return sdft_loss_topk(logits_BTV, idx_BTK, buckets_BTK1, mask_BT, **options)

        return Objective(buckets, loss_of(topk_divergence))

    if args.logits_chunk:

        def chunked_divergence(
            model, student_BTD, hidden_BTD, mask_BT
        ):  # no --base-kl-weight (config.validate)
            head = lm_head(model)
            return sdft_loss_chunked(
                lambda hidden: scaled(head(hidden)),
                student_BTD,
                hidden_BTD,
                mask_BT,
                chunk=args.logits_chunk,
                **options,
            )

        return Objective(teacher_hidden, loss_of(chunked_divergence, hidden=True))

    def full_divergence(model, student_BTV, logits_BTV, mask_BT):
        return sdft_loss(student_BTV, scaled(logits_BTV), mask_BT, **options)

    return Objective(teacher_logits, loss_of(full_divergence))


PARTS = (
    "sdft_loss",
    "sft_loss",
    "base_kl",
)  # the terms of the SDFT loss, as metrics.jsonl names them


def loss_parts(args: ObjectiveArgs) -> dict[str, tuple[str, float]]:
    """The terms of a run's loss as metrics.jsonl names them → (the report line's label, weight), those
    that are on: loss = Σ weight × part (`sdft_loss` 1, `sft_loss` --sft-weight, `base_kl`
    --base-kl-weight); none for --method sft, whose loss is one term."""
    if args.method != "sdft":
        return {}
    return {
        "sdft_loss": ("jsd" if args.divergence == "jsd" else "kl", 1.0),
        **({"sft_loss": ("sft", args.sft_weight)} if args.sft_weight else {}),
        **({"base_kl": ("base-kl", args.base_kl_weight)} if args.base_kl_weight else {}),
    }


DIVERGENCE_NAMES = {"forward": "forward KL", "reverse": "reverse KL", "jsd": "JSD"}


def describe(args: ObjectiveArgs, budget: guards.Budget) -> str:
    """The SDFT objective in one line (the startup panel): the divergence and the guards' loss terms,
    then the completion budget, the truncated mask and the skipped prefix, e.g. `forward KL + 0.5 x
    SFT, budget 2x demo, truncated masked, skip 0`; marked when those four options are PAPER_SDFT."""
    terms = [
        DIVERGENCE_NAMES[args.divergence]
        + (f" (beta {args.beta:g})" if args.divergence == "jsd" else "")
    ]
    terms += [f"{args.sft_weight:g} x SFT"] if args.sft_weight else []
    terms += (
        [f"{args.base_kl_weight:g} x base KL (--base-kl-weight)"] if args.base_kl_weight else []
    )
    cap = (
        f"budget {budget.completion_budget:g}x demo"
        if budget.completion_budget
        else f"no budget (--max-completion-length {budget.max_completion_length})"
    )
    line = (
        f"{' + '.join(terms)}, {cap}, truncated {'masked' if args.truncated == 'mask' else 'kept'}, "
        f"skip {args.skip_first_tokens}"
    )
    guards_now = {
        "skip_first_tokens": args.skip_first_tokens,
        "completion_budget": budget.completion_budget or 0.0,
        "truncated": args.truncated,
        "sft_weight": args.sft_weight,
    }
    return line + (": the paper's (PAPER_SDFT)" if guards_now == PAPER_SDFT else "")


def demonstrations(pairs: list[PromptPair], args: ObjectiveArgs) -> list[list[int]]:
    """SFT targets, cut to the room --max-seq-length leaves after the prompt."""
    return [p.demo_ids[: args.max_seq_length - len(p.student_ids)] for p in pairs]


def supervised_loss(model, pairs, args: ObjectiveArgs, shares: dict[str, float] | None = None):
    """The --method sft baseline: cross-entropy on the demonstration given the student prompt
    → (loss, ntoks); with `shares` (`term_counts`), the loss times this micro-batch's share of the step."""
    targets = demonstrations(pairs, args)
    loss, ntoks = sft_term(
        completion_logits(model, [p.student_ids for p in pairs], targets), targets
    )
    return (loss if shares is None else loss * shares["sft_loss"]), ntoks


def term_counts(pairs: list[PromptPair], args: ObjectiveArgs) -> dict[str, int]:
    """What each term of a micro-batch's loss is a mean over, from its prompts alone (before anything
    is sampled), keyed as `loss_parts` (--method sft: its one term, `sft_loss`). The SDFT and base-KL
    terms are means over sequences (each prompt's --num-generations completions, masked ones
    included); the SFT term is a token mean over the demonstrations of the distinct prompts that
    have one, as `demonstrations` cuts them. A term's share of an optimizer step is its count over
    the step's total (every micro-batch of every process), so k micro-batches, or W processes,
    weigh each term as one batch k·W times larger does (a token mean stays a token mean)."""
    if args.method != "sdft":
        return {"sft_loss": sum(len(t) for t in demonstrations(pairs, args))}
    tokens = sum(len(t) for t in demonstrations([p for p in pairs if p.demonstrated], args))
    sequences = len(pairs) * args.num_generations
    return {
        "sdft_loss": sequences,
        **({"sft_loss": tokens} if args.sft_weight else {}),
        **({"base_kl": sequences} if args.base_kl_weight else {}),
    }


def sft_term(logits_BTV: mx.array, targets: list[list[int]]):
    """(loss, ntoks): `sft_loss` of logits_BTV aligned to the demonstration tokens `targets`."""
    return sft_loss(logits_BTV, pad_rows(targets), completion_mask([len(t) for t in targets]))
