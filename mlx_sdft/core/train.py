"""The SDFT training loop: sample → teacher scores → student scores → loss → update → EMA →
report → save. `train()` is the whole algorithm; the helpers above it are small and pure."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_sdft.formats import checkpoint
from mlx_sdft.config import Config
from mlx_sdft.errors import Interrupted, TrainingError
from mlx_sdft.core.losses import sdft_loss, sdft_loss_chunked, sdft_loss_topk, sft_loss, teacher_topk
from mlx_sdft.formats.models import checkpointing
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.machine.report import PhaseTimer, Reporter, StopFlag
from mlx_sdft.core.rollout import sample
from mlx_sdft.core.scoring import completion_hidden, completion_logits, completion_mask, lm_head, pad_rows
from mlx_sdft.core.teacher import Leaves, init_teacher, step_teacher, trainable_leaves, using


def total_steps(cfg: Config, num_examples: int) -> int:
    if cfg.iters is not None:
        return cfg.iters
    prompts_per_step = cfg.batch_size * cfg.grad_accumulation_steps
    return max(1, math.ceil(cfg.epochs * num_examples / prompts_per_step))


def batch_at(cursor: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for the batch starting at `cursor` in the endless stream of shuffled
    epochs (epoch e is permutation (seed, e)). Stateless, so a cursor is all a resume needs."""
    orders: dict[int, np.ndarray] = {}  # one permutation per epoch the batch touches
    out = []
    for pos in range(cursor, cursor + batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(orders[epoch][i]))
    return out


def build_optimizer(cfg: Config, steps: int) -> optim.Optimizer:
    """Linear warmup to the peak rate, then cosine decay to 0 (the paper's schedule)."""
    warmup = int(cfg.warmup_ratio * steps)
    cosine = optim.cosine_decay(cfg.learning_rate, max(steps - warmup, 1))
    lr = optim.join_schedules([optim.linear_schedule(0.0, cfg.learning_rate, warmup), cosine], [warmup]) if warmup else cosine
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=cfg.weight_decay)


def completion_budget(pair: PromptPair, cfg: Config) -> int:
    """Tokens a completion may have so that both contexts stay within --max-seq-length."""
    room = cfg.max_seq_length - max(len(pair.student_ids), len(pair.teacher_ids))
    return min(cfg.max_completion_length, room)


TRAIN_STREAM, VALID_STREAM = 0, 1


def sequence_seed(seed: int, position: int, generation: int, stream: int = TRAIN_STREAM) -> int:
    """The sampling seed of one completion: fixed by its place in the data stream, so a resumed
    or data-parallel run draws exactly the completions a single uninterrupted run draws."""
    return int(np.random.SeedSequence([seed, stream, position, generation]).generate_state(1)[0])


def rollout_batch(model: nn.Module, pairs: list[PromptPair], cfg: Config, stop_ids: list[int],
                  positions: list[int] | None = None, stream: int = TRAIN_STREAM):
    """Each prompt repeated --num-generations times, sampled from the current student weights.
    `positions` (the prompts' places in the data stream) seed each completion; without them
    sampling draws from MLX's global random state."""
    seeds = None if positions is None else [
        sequence_seed(cfg.seed, p, g, stream) for p in positions for g in range(cfg.num_generations)]
    pairs = [p for p in pairs for _ in range(cfg.num_generations)]
    rollout = sample(
        model, [p.student_ids for p in pairs], [completion_budget(p, cfg) for p in pairs], stop_ids,
        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(pairs), seeds=seeds, fuse=cfg.fuse_sampling,
    )
    return pairs, rollout


def scaled(logits: mx.array, cfg: Config) -> mx.array:
    # Divide by the temperature in float32: in bf16 the division itself would round.
    return logits.astype(mx.float32) / cfg.temperature


def student_loss(model, pairs, completions, teacher_scores, cfg: Config):
    """The SDFT objective for one micro-batch; gradients flow through the student only.
    `teacher_scores` is what `teacher_logits` returned: full logits, top-K buckets, or (with
    --logits-chunk) final hidden states."""
    prompts = [p.student_ids for p in pairs]
    mask_BT = completion_mask([len(c) for c in completions])
    if cfg.topk:
        idx_BTK, buckets_BTK1 = teacher_scores
        logits_BTV = scaled(completion_logits(model, prompts, completions), cfg)
        return sdft_loss_topk(logits_BTV, idx_BTK, buckets_BTK1, mask_BT, divergence=cfg.divergence,
                              skip=cfg.skip_first_tokens, beta=cfg.beta)
    if cfg.logits_chunk:
        head = lm_head(model)
        return sdft_loss_chunked(lambda hidden: scaled(head(hidden), cfg), completion_hidden(model, prompts, completions),
                                 teacher_scores, mask_BT, chunk=cfg.logits_chunk, divergence=cfg.divergence,
                                 skip=cfg.skip_first_tokens, beta=cfg.beta)
    logits_BTV = scaled(completion_logits(model, prompts, completions), cfg)
    return sdft_loss(logits_BTV, scaled(teacher_scores, cfg), mask_BT,
                     divergence=cfg.divergence, skip=cfg.skip_first_tokens, beta=cfg.beta)


def demonstrations(pairs: list[PromptPair], cfg: Config) -> list[list[int]]:
    """SFT targets, cut to the room --max-seq-length leaves after the prompt."""
    return [p.demo_ids[: cfg.max_seq_length - len(p.student_ids)] for p in pairs]


def supervised_loss(model, pairs, cfg: Config):
    """The --method sft baseline: cross-entropy on the demonstration given the student prompt."""
    targets = demonstrations(pairs, cfg)
    logits_BTV = completion_logits(model, [p.student_ids for p in pairs], targets)
    return sft_loss(logits_BTV, pad_rows(targets), completion_mask([len(t) for t in targets]))


def teacher_logits(model, teacher: Leaves | None, pairs, completions, cfg: Config):
    """The teacher's side of the loss, without gradient: its completion logits; with --topk only
    its top-K buckets, so that [B, T, V] need not stay through the student's backward pass; with
    --logits-chunk its final hidden states, which the student's loss turns into logits a chunk
    at a time (and top-K buckets too are taken chunk by chunk)."""
    prompts = [p.teacher_ids for p in pairs]
    with using(model, teacher):
        if not cfg.logits_chunk:
            logits_BTV = mx.stop_gradient(completion_logits(model, prompts, completions))
            return teacher_topk(scaled(logits_BTV, cfg), cfg.topk) if cfg.topk else logits_BTV
        hidden_BTD = mx.stop_gradient(completion_hidden(model, prompts, completions))
    if not cfg.topk:
        return hidden_BTD
    head, C = lm_head(model), cfg.logits_chunk
    chunks = [teacher_topk(scaled(head(hidden_BTD[:, t:t + C]), cfg), cfg.topk) for t in range(0, hidden_BTD.shape[1], C)]
    return tuple(mx.concatenate(parts, axis=1) for parts in zip(*chunks))


def validation_loss(model, teacher, pairs: list[PromptPair], cfg: Config, stop_ids, group=None) -> dict:
    """SDFT: mean teacher–student divergence on fresh student samples of the validation prompts.
    SFT: cross-entropy on the validation demonstrations. With a distributed `group`, each rank
    scores every W-th batch and the sums are shared: the same numbers, 1/W of the work each."""
    world, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    batches = math.ceil(len(pairs) / cfg.batch_size)
    n = batches if cfg.val_batches < 0 else min(cfg.val_batches, batches)
    totals = [0.0, 0.0, 0, 0]  # loss sum, length sum, batches, sequences
    for b in range(rank, max(n, 1), world):
        start = b * cfg.batch_size
        batch = pairs[start:start + cfg.batch_size]
        if cfg.method == "sft":
            loss, _ = supervised_loss(model, batch, cfg)
            lengths = [len(t) for t in demonstrations(batch, cfg)]
        else:
            # The same seeds at every validation: differences between steps come from the weights.
            positions = list(range(start, start + len(batch)))
            batch, rollout = rollout_batch(model, batch, cfg, stop_ids, positions, VALID_STREAM)
            t_logits = teacher_logits(model, teacher, batch, rollout.completions, cfg)
            loss, _ = student_loss(model, batch, rollout.completions, t_logits, cfg)
            lengths = [len(c) for c in rollout.completions]
        totals = [totals[0] + loss.item(), totals[1] + sum(lengths), totals[2] + 1, totals[3] + len(lengths)]
    if world > 1:
        totals = mx.distributed.all_sum(mx.array(totals, dtype=mx.float32), group=group).tolist()
    return {"val_loss": totals[0] / totals[2], "val_completion_len": totals[1] / totals[3]}


def micro_step(model, loss_and_grad, teacher, pairs, positions, cfg: Config, stop_ids, timer: PhaseTimer):
    """One micro-batch: (SDFT) sample, teacher logits, student loss and gradient; (SFT) the
    cross-entropy and its gradient. Returns (loss, ntoks, grads, stats)."""
    stats = {"n": len(pairs) * (cfg.num_generations if cfg.method == "sdft" else 1)}
    if cfg.method == "sft":
        with timer("student"), checkpointing(model, cfg.grad_checkpoint):
            (loss, ntoks), grads = loss_and_grad(model, pairs, cfg)
            mx.eval(loss, ntoks, grads)
        return loss, ntoks, grads, {**stats, "length": int(ntoks.item())}
    with timer("sample"):
        pairs, rollout = rollout_batch(model, pairs, cfg, stop_ids, positions)
    with timer("teacher"):
        t_logits = teacher_logits(model, teacher, pairs, rollout.completions, cfg)
        mx.eval(t_logits)
    with timer("student"), checkpointing(model, cfg.grad_checkpoint):
        (loss, ntoks), grads = loss_and_grad(model, pairs, rollout.completions, t_logits, cfg)
        mx.eval(loss, ntoks, grads)
    return loss, ntoks, grads, {**stats, "sampled": rollout.num_tokens, "length": rollout.num_tokens,
                                "truncated": sum(rollout.truncated)}


def train(model: nn.Module, tokenizer, train_pairs: list[PromptPair], valid_pairs: list[PromptPair],
          cfg: Config, base: Leaves, reporter: Reporter, stop: StopFlag | None = None, group=None) -> dict:
    """Run SDFT (or SFT); returns the last report record. Everything lands in cfg.adapter_path.

    With an mx.distributed `group` of W processes, each samples and scores every W-th prompt
    of a micro-batch and gradients are averaged, so all ranks hold the same adapters and
    teacher; only rank 0 writes files.
    """
    world, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    out = Path(cfg.adapter_path)
    steps = total_steps(cfg, len(train_pairs))
    stop_ids = sorted(tokenizer.eos_token_ids)
    optimizer = build_optimizer(cfg, steps)
    teacher_kind = cfg.teacher if cfg.method == "sdft" else "live"  # SFT has no teacher: None leaves
    teacher = init_teacher(teacher_kind, model, base)
    first, cursor = 1, 0
    if cfg.resume:
        state, saved_teacher = checkpoint.load_state(out, optimizer, model)
        first, cursor = state["step"] + 1, state["cursor"]
        teacher = saved_teacher if teacher_kind == "ema" else teacher
        if rank == 0:
            checkpoint.truncate_metrics(out, state["step"])
        reporter.print(f"resuming after step {state['step']} (epoch {state['epoch']:.2f})")
    loss_and_grad = nn.value_and_grad(model, student_loss if cfg.method == "sdft" else supervised_loss)
    bad_steps, window, record = 0, [], {}
    model.train()

    for step in range(first, steps + 1):
        timer, grads, stats = PhaseTimer(), None, {}
        for _ in range(cfg.grad_accumulation_steps):
            indices = batch_at(cursor, len(train_pairs), cfg.batch_size, cfg.seed)[rank::world]
            positions = list(range(cursor, cursor + cfg.batch_size))[rank::world]
            cursor += cfg.batch_size
            pairs = [train_pairs[i] for i in indices]
            loss, ntoks, g, micro = micro_step(model, loss_and_grad, teacher, pairs, positions, cfg, stop_ids, timer)
            if world > 1:  # equal shares, so the mean of rank means is the batch mean
                g = nn.average_gradients(g, group=group)
                loss, ntoks = mx.distributed.all_sum(loss, group=group) / world, mx.distributed.all_sum(ntoks, group=group)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            for key, value in {**micro, "loss": loss.item() / cfg.grad_accumulation_steps, "ntoks": int(ntoks.item())}.items():
                stats[key] = stats.get(key, 0) + value

        with timer("student"):
            grads = tree_map(lambda g: g / cfg.grad_accumulation_steps, grads)
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip else (grads, mx.array(0.0))
            if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm.item())):
                bad_steps += 1  # skip the update: one NaN would poison the adapters and the teacher
                reporter.print(f"[yellow]step {step}: non-finite loss or gradient, update skipped[/]")
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainingError(f"step {step}: {bad_steps} non-finite steps in a row; lower --learning-rate")
            else:
                bad_steps = 0
                optimizer.update(model, grads)
                mx.eval(model.parameters(), optimizer.state)
        teacher = step_teacher(teacher_kind, teacher, model, cfg.teacher_update_rate)

        window.append({**stats, **timer.seconds, "grad_norm": grad_norm.item()})
        reporter.advance(step, stats["loss"])
        if step % cfg.steps_per_report == 0 or step == steps:
            record = _summarize(window, step, optimizer)
            reporter.log(record)
            window = []
        if valid_pairs and (step % cfg.steps_per_eval == 0 or step == steps):
            with timer("eval"):
                val = validation_loss(model, teacher, valid_pairs, cfg, stop_ids, group)
            reporter.log({"type": "eval", "step": step, **val, "val_s": timer.seconds["eval"]})
        interrupted = stop is not None and stop.requested
        if rank == 0 and (step % cfg.save_every == 0 or step == steps or interrupted):
            state = {"cursor": cursor, "epoch": cursor / len(train_pairs), "total_steps": steps}
            checkpoint.save(out, cfg, step, trainable_leaves(model), teacher, optimizer, state,
                            checkpoint=step % cfg.save_every == 0)
        if interrupted:
            raise Interrupted(step)
    return record


def _summarize(window: list[dict], step: int, optimizer: optim.Optimizer) -> dict:
    """One report line: per-step means over the window, rates over its summed times."""
    k = len(window)
    total = lambda key: sum(w.get(key, 0.0) for w in window)  # noqa: E731
    busy = total("sample") + total("teacher") + total("student")
    return {
        "type": "train",
        "step": step,
        "loss": total("loss") / k,
        "learning_rate": float(optimizer.learning_rate.item()),
        "grad_norm": total("grad_norm") / k,
        "sample_s": total("sample") / k,
        "teacher_s": total("teacher") / k,
        "student_s": total("student") / k,
        "sampled_tps": total("sampled") / max(total("sample"), 1e-9),
        "trained_tps": total("ntoks") / max(busy, 1e-9),
        "completion_len": total("length") / max(total("n"), 1),
        "truncated": total("truncated") / max(total("n"), 1),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }

