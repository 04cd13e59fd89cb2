"""TRL's SDFTTrainer (`trl.experimental.sdft`) on bench.py's settings, torch on the CPU.

Run with the benchmark's own virtualenv, never the project's (TRL pulls torch and its own pins):
    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.13.0 trl peft
    /work/bench-venv/bin/python bench/trl_bench.py [--quick] [--full-finetune]
Prints a table line and one JSON line with the median step time; bench.py --trl runs this and
divides its own SDFT step by that.

Same as bench.py: the llama shapes from shapes.py with random float32 weights (fixed seed), LoRA
rank 8 on every linear of every block (PEFT, "all-linear"; --full-finetune trains all weights
instead), batch of 4 prompts, one generation each, student prompts of 64 tokens, teacher prompts
of 160, completions of exactly 48 tokens (min_new_tokens = max_new_tokens, so EOS cannot end
them), temperature 1, top-p 1, full-vocabulary logits, forward KL (distillation_alpha=0 is
KL(teacher‖student)), first 3 tokens skipped, EMA teacher at rate 0.01, AdamW, clip 1.0, no
importance-sampling clip (mlx-sdft has none), float32, no gradient checkpointing (TRL turns it on by
default; mlx-sdft's default is off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl.experimental.sdft import SDFTConfig, SDFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import FULL, QUICK, SEED, machine  # noqa: E402


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One whitespace-separated word per id ("t0" … "t{V-1}"), so a prompt of n words is n tokens."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2"
    )


def dataset(s: dict, rows: int) -> Dataset:
    """Plain-text prompts (no chat template): the student prompt is `student_len` words, the
    teacher prompt TRL builds, "{prompt}\\n\\n{privileged_context}", is `teacher_len` words."""
    g = torch.Generator().manual_seed(SEED)
    words = lambda n: " ".join(
        f"t{i}" for i in torch.randint(3, s["model"]["vocab_size"], (n,), generator=g).tolist()
    )  # noqa: E731
    return Dataset.from_list(
        [
            {
                "prompt": words(s["student_len"]),
                "privileged_context": words(s["teacher_len"] - s["student_len"]),
            }
            for _ in range(rows)
        ]
    )


class StepTimer(TrainerCallback):
    """Wall-clock from on_step_begin to on_step_end; added last, so the EMA callback is inside."""

    def __init__(self):
        self.steps, self._tic = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._tic = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self._tic)


def time_phases(trainer: SDFTTrainer, phases: dict):
    """Sum wall-clock of generation and of the teacher forward (the no-grad `_forward_logits`)."""

    def timed(name, fn, when=lambda: True):
        def wrapper(*a, **k):
            tic = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if when():
                    phases.setdefault(name, []).append(time.perf_counter() - tic)

        return wrapper

    trainer._generate = timed("sample", trainer._generate)
    trainer._forward_logits = timed(
        "teacher", trainer._forward_logits, lambda: not torch.is_grad_enabled()
    )


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full-finetune", action="store_true", help="train all weights (no PEFT)")
    ap.add_argument(
        "--reps", type=int, help="timed steps after one warm-up step (default: 2, quick 1)"
    )
    args = ap.parse_args()
    s = dict(QUICK if args.quick else FULL)
    # Two timed steps by default: with these settings TRL 1.16's third step has a NaN gradient
    # and the fourth step's generation then fails (see bench/README.md).
    reps = args.reps or s["reps"]
    steps = s["warmup"] + reps

    torch.manual_seed(SEED)
    m = s["model"]
    config = LlamaConfig(
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"],
        head_dim=m["head_dim"],
        vocab_size=m["vocab_size"],
        tie_word_embeddings=True,
        rope_theta=m["rope_theta"],
        rms_norm_eps=m["rms_norm_eps"],
        max_position_embeddings=m["max_position_embeddings"],
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(config).float()
    peft = (
        None
        if args.full_finetune
        else LoraConfig(
            r=s["lora_rank"],
            lora_alpha=20 * s["lora_rank"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    )
    out = tempfile.mkdtemp(prefix="trl_bench_")
    cfg = SDFTConfig(
        output_dir=out,
        per_device_train_batch_size=s["batch"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=1e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        num_generations=1,
        max_prompt_length=None,
        max_completion_length=s["completion"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": s["completion"]},
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        distillation_is_clip=None,
        num_loss_tokens_to_skip=3,
        teacher_model_kind="ema",
        teacher_update_rate=0.01,
        teacher_sync_steps=1,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=SEED,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
    )  # TRL's default is on; mlx-sdft's --grad-checkpoint is off
    trainer = SDFTTrainer(
        model=model,
        args=cfg,
        train_dataset=dataset(s, s["batch"] * steps),
        processing_class=word_tokenizer(m["vocab_size"]),
        peft_config=peft,
    )
    timer, phases = StepTimer(), {}
    trainer.add_callback(timer)
    time_phases(trainer, phases)
    try:
        trainer.train()
    except Exception as e:  # say exactly what failed, with the steps that ran before it
        print(
            json.dumps(
                {
                    "error": f"{type(e).__name__}: {e}",
                    "steps_s": timer.steps,
                    "log": [
                        {k: h.get(k) for k in ("step", "loss", "grad_norm", "learning_rate")}
                        for h in trainer.state.log_history
                    ],
                }
            )
        )
        raise

    timed = timer.steps[s["warmup"] :]
    per_step = {k: statistics.median(v[s["warmup"] :]) for k, v in phases.items()}
    step = statistics.median(timed)
    record = {
        "bench": "trl-sdft",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "trl": __import__("trl").__version__,
        "peft": None if args.full_finetune else __import__("peft").__version__,
        "training": "full fine-tuning"
        if args.full_finetune
        else f"LoRA rank {s['lora_rank']}, all linears",
        "teacher": "EMA adapter (PEFTAdapterEMACallback)"
        if peft
        else "EMA copy of the model (SyncTeacherModelCallback)",
        **{k: v for k, v in machine().items() if k not in ("blas", "openblas")},
        "step_s": round(step, 3),
        "step_min_s": round(min(timed), 3),
        "steps_s": [round(t, 3) for t in timer.steps],
        "phases_s": {k: round(v, 3) for k, v in per_step.items()},
        "phases_per_step_s": {k: [round(t, 3) for t in v] for k, v in phases.items()},
        "torch_blas": next(
            (
                ln.split("=", 1)[1].strip(" ,")
                for ln in torch.__config__.show().split(",")
                if "BLAS_INFO" in ln
            ),
            "?",
        ),
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        "completion_lengths": [
            h["completions/mean_length"]
            for h in trainer.state.log_history
            if "completions/mean_length" in h
        ],
    }
    print(
        f"TRL {record['trl']} SDFTTrainer, torch {record['torch']} ({record['torch_threads']} threads), "
        f"{record['training']}: {step:.2f} s/step; phases {record['phases_s']}"
    )
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
