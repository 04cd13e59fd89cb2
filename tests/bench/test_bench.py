"""Smoke tests of the benchmarks: each bench/ script's `--quick` run prints its JSON record.

They run the scripts, so they are marked `bench`: the default `python -m pytest` leaves them out
and CI runs them after it (`.ci/run`) with

    python -m pytest -m bench

Nothing here asserts a time or a ratio's value: timings on a shared CI machine are noise, and
the targets are for bench/README.md, not for CI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RATIOS = {
    "sdft_vs_sft_step",
    "sampling_vs_batch_gen",
    "peak_memory_sdft_vs_sft",
    "student_flops_vs_peak",
}


@pytest.mark.bench
def test_bench_quick_prints_a_json_record_with_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert json.loads(out.read_text()) == record
    assert RATIOS <= set(record["ratios"])
    assert all(isinstance(v, float) and v > 0 for v in record["ratios"].values())
    assert record["quick"] is True and record["mlx"] and record["device"] and "blas" in record
    assert set(record["sdft_phases_s"]) == {"sample", "teacher", "student", "update", "ema"}
    assert "sdft_vs_sft_step" in proc.stdout.split("{")[0]  # the readable table comes first


def test_student_flops_counts_activation_gradients_not_weight_gradients():
    sys.path.insert(0, str(ROOT / "bench"))
    from shapes import SMOLLM2, student_flops

    flops = student_flops(SMOLLM2, batch=4, input_len=111, completion=48, rank=8)
    frozen_linears = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    params = frozen_linears + 49152 * 576  # + the tied embedding
    # Over 3x the frozen linears' forward (activation gradients), plus attention, LoRA and the head
    # on completion positions only; under 6·params·tokens, which counts weight gradients of frozen
    # weights and the LM head on every position.
    assert 3 * 2 * frozen_linears * 4 * 111 < flops["total"] < 6 * params * 4 * 111


def _quick(script, tmp_path) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / script),
            "--quick",
            "--reps",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert json.loads(out.read_text()) == record and record["quick"] is True and "blas" in record
    return record


@pytest.mark.bench
def test_chunk_bench_quick_compares_every_chunk_size_with_the_whole(tmp_path):
    record = _quick("chunk.py", tmp_path)
    assert (
        set(record["memory_vs_whole"]) == {"0", "64", "16"}
        and record["memory_vs_whole"]["0"] == 1.0
    )
    assert all(v > 0 for v in record["peak_above_resident_gb"].values())


@pytest.mark.bench
def test_sampling_bench_quick_times_both_sides_of_each_shortcut(tmp_path):
    record = _quick("sampling.py", tmp_path)
    assert len(record["cases"]) == 4
    assert all(
        len(c["fast_s"]) == len(c["slow_s"]) == 1 and c["ratio"] > 0
        for c in record["cases"].values()
    )
    ops = record["primitives_per_token"]
    assert 0 < ops["fused"] < ops["unfused"]  # fusing removes the adapters' own operations


@pytest.mark.bench
def test_loss_bench_quick_times_both_gradients(tmp_path):
    record = _quick("loss.py", tmp_path)
    assert set(record["cases"]) == {"forward", "reverse", "jsd"}
    assert all(c["time_ratio"] > 0 and c["memory_ratio"] > 0 for c in record["cases"].values())


@pytest.mark.bench
def test_per_token_bench_quick_times_the_trainer_against_mlx_lm_and_each_shortcut(tmp_path):
    record = _quick("per_token.py", tmp_path)
    assert set(record["cases"]) == {
        f"tiny, batch {b}{lever}"
        for b in (1, 4)
        for lever in (
            "",
            ", trainer vs without compiled sampling",
            ", trainer vs without no mask when unpadded",
        )
    }
    for case in record["cases"].values():
        assert case["tokens"] == 8 and all(case[f"{clock}_ratio"] > 0 for clock in ("wall", "cpu"))
        assert all(
            len(v) == 1 for clock in ("wall", "cpu") for v in case[f"{clock}_ms_per_token"].values()
        )
    ops = record["operations_per_decode_step"]
    assert set(ops) == {"tiny, batch 1", "tiny, batch 4"} and all(
        0 < o["shortcuts"] < o["plain"] for o in ops.values()
    )


@pytest.mark.bench
def test_prefill_share_bench_quick_times_both_sides_on_equal_tokens(tmp_path):
    record = _quick("prefill_share.py", tmp_path)
    cases = record["cases"]
    assert (
        set(cases) == {"num_generations 1", "num_generations 4", "prefill alone"}
        and record["common_prefix"][0] >= 2
    )
    for case in (
        cases["num_generations 1"],
        cases["num_generations 4"],
    ):  # the script stops on other tokens
        assert [len(r) for r in case["runs"].values()] == [1, 1] and case["ratio_wall"] > 0
        assert case["runs"]["shared"][0]["tokens"] == case["runs"]["whole"][0]["tokens"] > 0
    assert [len(r) for r in cases["prefill alone"]["runs"].values()] == [4, 4] and cases[
        "prefill alone"
    ]["ratio_cpu"] > 0


@pytest.mark.bench
def test_whole_run_bench_quick_runs_both_methods_start_to_finish(tmp_path):
    record = _quick("whole_run.py", tmp_path)
    assert record["iters"] == 1 and record["config"] == "recipes/quickstart/config.yaml"
    runs = record["runs"]
    assert len(runs["sdft"]) == len(runs["sft"]) == 1 and runs["sdft"][0]["wall_s"] > 0
    assert (
        runs["sdft"][0]["phases_per_step_s"]["sample_s"]
        > 0
        == runs["sft"][0]["phases_per_step_s"]["sample_s"]
    )
    assert set(record["ratios"]) == {"sdft_vs_sft_wall", "sdft_vs_sft_cpu"}
