"""Which weights teach: `ema` (default), `base` or `live`, and the EMA update.

The teacher is the same model with other values in its trainable leaves (for LoRA: a second
set of lora_a / lora_b, never a second copy of the model). Scoring with the teacher swaps
those leaves in, runs the forward pass, and swaps the student's back.

- ema:  φ ← (1 − r)·φ + r·θ after every optimizer step, φ₀ = θ₀ (the paper's teacher).
- base: the leaves as they were before any training; for LoRA/DoRA this is exactly the
        model with adapters switched off (lora_b = 0), for full fine-tuning the base weights.
- live: the student itself (no separate leaves).

The model's modes around these passes: `using` (other leaves), `evaluating` (no dropout) and
`checkpointing` (--grad-checkpoint, only while the student's gradient is taken).
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import grad_checkpoint

Leaves = dict[str, mx.array]


def trainable_leaves(model: nn.Module) -> Leaves:
    return dict(tree_flatten(model.trainable_parameters()))


def copy_leaves(leaves: Leaves) -> Leaves:
    # mx arrays are immutable values; an explicit copy keeps the teacher independent of
    # any in-place buffer donation by the optimizer.
    return {k: mx.array(v) for k, v in leaves.items()}


def ema_update(teacher: Leaves, student: Leaves, rate: float) -> Leaves:
    """φ ← (1 − rate)·φ + rate·θ, leaf by leaf: with rate r the teacher moves r of the way to the student."""
    return tree_map(lambda phi, theta: (1.0 - rate) * phi + rate * theta, teacher, student)


def init_teacher(kind: str, model: nn.Module, base: Leaves) -> Leaves | None:
    """The teacher's leaves at step 0; None means "use the live student"."""
    if kind == "ema":
        return copy_leaves(trainable_leaves(model))
    if kind == "base":
        return base
    if kind == "live":
        return None
    raise ValueError(f"unknown teacher kind {kind!r}")


def step_teacher(kind: str, teacher: Leaves | None, model: nn.Module, rate: float) -> Leaves | None:
    """Called after every optimizer step."""
    if kind != "ema":
        return teacher
    teacher = ema_update(teacher, trainable_leaves(model), rate)
    mx.eval(teacher)
    return teacher


@contextmanager
def using(model: nn.Module, leaves: Leaves | None):
    """Run the model with `leaves` in place of its trainable parameters (None: as it is)."""
    if leaves is None:
        yield model
        return
    saved = trainable_leaves(model)
    model.load_weights(list(leaves.items()), strict=False)
    try:
        yield model
    finally:
        model.load_weights(list(saved.items()), strict=False)


@contextmanager
def evaluating(model: nn.Module):
    """Run the model in eval mode (no LoRA dropout), then back in the mode it was in. Every pass that
    scores without training runs so: the teacher's, the base model's (--base-kl-weight) and
    validation's; only the student's training pass draws dropout."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def checkpointing(model: nn.Module, on: bool):
    """--grad-checkpoint: blocks recompute their activations in the backward pass, only while the
    student's gradient is taken; sampling and the teacher's forward run the plain blocks.
    (mlx-lm's grad_checkpoint patches the block class itself, so it is undone on exit.)"""
    block = type(model.layers[0])
    plain = block.__call__
    if on:
        grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        block.__call__ = plain
