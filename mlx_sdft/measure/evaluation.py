"""One evaluation of a set of adapters, every number `eval` and `continual` report: the task score
(task.py), the degenerate and repetitive rates of greedy answers to general prompts and, with a base
to compare, retention KL and the base's rates (retention.py), and the perplexity of prior text
(perplexity.py) under the adapted and the base model."""

from __future__ import annotations

from mlx_sdft.core.data import Example
from mlx_sdft.core.metrics import Metric
from mlx_sdft.core.teacher import Leaves, using
from mlx_sdft.measure.perplexity import load_texts, perplexity
from mlx_sdft.measure.retention import general_answers, load_prompts, rate, retention_kl
from mlx_sdft.measure.task import evaluate_task


def evaluate_adapters(
    model,
    tokenizer,
    base: Leaves | None,
    examples: list[Example],
    metric: Metric,
    cfg,
    progress=None,
) -> tuple[dict, list[dict], list[dict]]:
    """All numbers of one evaluation (`cfg`: the eval options): the task score, the degenerate rate
    of greedy answers to the general prompts, and with a base to compare, retention and the base's
    degenerate rate. Returns (summary, task rows, general-prompt rows). With a rich `progress`, bars
    count the task prompts, the general prompts answered and the retention prompts."""

    def bar(name: str, total: int):
        if progress is None:
            return None
        task_id = progress.add_task(name, total=total)
        return lambda n: progress.advance(task_id, n)

    def answer_general(prompts: list[list[dict]], of_base: bool = False) -> list[dict]:
        """Greedy answers to the general prompts by the weights in place; their degenerate and
        repetitive rates go in the summary (`of_base`: the base's, keys ending in _base)."""
        rows = general_answers(
            model,
            tokenizer,
            prompts,
            cfg.general_max_tokens,
            cfg.batch_size,
            bar("general prompts, base" if of_base else "general prompts", len(prompts)),
        )
        end = "_base" if of_base else ""
        summary[f"degenerate_rate{end}"] = rate(rows)
        summary[f"repetitive_rate{end}"] = rate(rows, "repetitive")
        return rows

    task = evaluate_task(
        model,
        tokenizer,
        examples,
        metric,
        cfg.max_tokens,
        cfg.batch_size,
        bar("task prompts", len(examples)),
    )
    summary, general = {"task_score": task.score, "examples": len(examples)}, []
    if cfg.retention:
        prompts = load_prompts(cfg.general_prompts, cfg.num_general_prompts)
        general = answer_general(prompts)
    if base is not None and cfg.retention:
        summary["retention_kl"] = retention_kl(
            model,
            tokenizer,
            base,
            prompts,
            cfg.retention_max_tokens,
            cfg.batch_size,
            bar("retention prompts", len(prompts)),
        )
        with using(model, base):
            base_rows = answer_general(prompts, of_base=True)
        general = [
            {
                **r,
                "base_answer": b["answer"],
                "base_degenerate": b["degenerate"],
                "base_repetitive": b["repetitive"],
            }
            for r, b in zip(general, base_rows)
        ]
    if cfg.prior_text:
        texts = load_texts(cfg.prior_text)
        summary["prior_ppl"] = perplexity(
            model, tokenizer, texts, cfg.max_seq_length, cfg.batch_size
        )
        if base is not None:
            with using(model, base):
                summary["prior_ppl_base"] = perplexity(
                    model, tokenizer, texts, cfg.max_seq_length, cfg.batch_size
                )
    return summary, task.rows, general
