"""Nothing trained is lost: exact resume, kills at any moment, Ctrl-C, a full disk, NaNs."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.formats import checkpoint
from mlx_sdft.config import load_config
from mlx_sdft.errors import InputError, Interrupted, TrainingError
from mlx_sdft.jobs.train import run_train

ITERS = 6


def _opts(tiny_model, smoke_data, out, **kw):
    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        batch_size=2,
        iters=ITERS,
        max_completion_length=10,
        learning_rate=5e-3,
        steps_per_report=1,
        steps_per_eval=4,
        val_batches=1,
        save_every=1,
        seed=7,
    )
    return {**opts, **kw}


def _adapters(out):
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted run, to compare every interrupted one with."""
    from conftest import ROOT

    out = tmp_path_factory.mktemp("reference") / "adapters"
    run_train(load_config(None, _opts(tiny_model, ROOT / "recipes/smoke/data", out)), quiet=True)
    return _adapters(out), {
        k: np.array(v) for k, v in mx.load(str(out / "teacher_adapters.safetensors")).items()
    }


def assert_consistent(out):
    """After recovery every state file belongs to the step trainer_state.json names."""
    checkpoint.recover(out)
    step = json.loads((out / "trainer_state.json").read_text())["step"]
    for name in (
        "adapters.safetensors",
        "teacher_adapters.safetensors",
        "optimizer_state.safetensors",
    ):
        assert checkpoint.saved_step(out / name) == step, name
    assert json.loads((out / "adapter_config.json").read_text())["sdft"]["step"] == step
    assert not list(out.glob(".pending-*")) and not list(out.glob(".tmp-*"))
    return step


class StopAt:
    def __init__(self, step):
        self.step, self.calls = step, 0

    @property
    def requested(self):
        self.calls += 1
        return self.calls >= self.step


def test_resume_after_interrupt_equals_uninterrupted_run(
    tiny_model, smoke_data, tmp_path, reference, monkeypatch
):
    out = tmp_path / "a"
    import mlx_sdft.jobs.train as launch

    monkeypatch.setattr(launch, "StopFlag", lambda reporter: _Ctx(StopAt(3)))
    with pytest.raises(Interrupted) as e:
        run_train(load_config(None, _opts(tiny_model, smoke_data, out)), quiet=True)
    assert e.value.step == 3 and assert_consistent(out) == 3
    monkeypatch.undo()
    run_train(load_config(None, _opts(tiny_model, smoke_data, out, resume=True)), quiet=True)
    _assert_same(_adapters(out), reference[0])
    teacher = {
        k: np.array(v) for k, v in mx.load(str(out / "teacher_adapters.safetensors")).items()
    }
    _assert_same(teacher, reference[1])
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "train"
    ]
    assert steps == list(range(1, ITERS + 1))  # no duplicated records after the resume


class _Ctx:
    def __init__(self, flag):
        self.flag = flag

    def __enter__(self):
        return self.flag

    def __exit__(self, *exc):
        pass


def _cli(tiny_model, smoke_data, out, *extra):
    args = [sys.executable, "-m", "mlx_sdft", "train"]
    for k, v in _opts(tiny_model, smoke_data, out).items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + list(extra)


def _after_first_save(proc, out) -> float:
    """Wait until the run has saved once; the time of that moment."""
    deadline = time.time() + 60
    while proc.poll() is None and not list(out.glob("*.safetensors")) and time.time() < deadline:
        time.sleep(0.01)
    return time.time()


def test_sigkill_at_random_moments_then_resume(tiny_model, smoke_data, tmp_path, reference):
    # How long a run trains after its first save on this machine: the kills land inside that span.
    calibration = subprocess.Popen(
        _cli(tiny_model, smoke_data, tmp_path / "cal"), stdout=subprocess.DEVNULL
    )
    saved = _after_first_save(calibration, tmp_path / "cal")
    calibration.wait()
    span = time.time() - saved
    out, rng, kills, torn, misses = tmp_path / "k", random.Random(0), 0, 0, 0
    args = _cli(tiny_model, smoke_data, out)
    for attempt in range(24):
        resume = ["--resume"] if (out / "trainer_state.json").exists() else ["--overwrite"]
        proc = subprocess.Popen(args + resume, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill after a random delay once the run has saved: often in the middle of a save. The
        # delay halves each time a run finished first, so a loaded machine still gets its kills.
        _after_first_save(proc, out)
        time.sleep(rng.uniform(0.0, 0.8 * span) * 0.5**misses)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        else:
            misses += 1
        proc.wait()
        torn += bool(list(out.glob(".pending-*")))  # killed inside a save
        if (out / "trainer_state.json").exists() or list(out.glob(".pending-*")):
            step = assert_consistent(out)
            if step == ITERS and proc.returncode == 0:
                if kills >= 2:
                    break
                shutil.rmtree(out)  # finished before two kills landed: start over, killing sooner
    else:
        subprocess.run(args + ["--resume"], check=True, capture_output=True)
    print(f"SIGKILLs survived: {kills}; a torn save was recovered {torn} times")
    assert kills >= 2, "the kills should land while training"
    _assert_same(_adapters(out), reference[0])


def test_ctrl_c_saves_and_exits_130(tiny_model, smoke_data, tmp_path, reference):
    out = tmp_path / "c"
    proc = subprocess.Popen(
        _cli(tiny_model, smoke_data, out, "--iters", "400"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (out / "trainer_state.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert "interrupted after step" in last and "--resume" in last
    step = assert_consistent(out)
    assert 1 <= step < 400


def test_full_disk_keeps_the_last_good_checkpoint(
    tiny_model, smoke_data, tmp_path, reference, monkeypatch
):
    out, calls = tmp_path / "d", {"n": 0}
    real = checkpoint.write_arrays

    def failing(path, arrays, step=None):
        calls["n"] += 1
        if calls["n"] == 9:  # the middle of the third save
            raise OSError(28, "No space left on device")
        return real(path, arrays, step)

    monkeypatch.setattr(checkpoint, "write_arrays", failing)
    with pytest.raises(
        TrainingError,
        match="could not save .*No space left on device.*previous checkpoint is intact",
    ):
        run_train(load_config(None, _opts(tiny_model, smoke_data, out)), quiet=True)
    assert assert_consistent(out) == 2
    monkeypatch.undo()
    run_train(load_config(None, _opts(tiny_model, smoke_data, out, resume=True)), quiet=True)
    _assert_same(_adapters(out), reference[0])


def test_non_finite_steps_are_skipped_then_stop(tiny_model, smoke_data, tmp_path, monkeypatch):
    import mlx_sdft.core.train as train

    real, calls = train.sdft_step, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += kwargs["grad"]  # training micro-batches only, not validation
        loss, ntoks, grads, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] >= 3 else loss), ntoks, grads, stats

    monkeypatch.setattr(train, "sdft_step", poisoned)
    out = tmp_path / "n"
    with pytest.raises(TrainingError, match=r"step 5: 3 non-finite steps in a row"):
        run_train(
            load_config(None, _opts(tiny_model, smoke_data, out, max_bad_steps=3)), quiet=True
        )
    assert assert_consistent(out) == 4  # steps 3 and 4 were skipped but saved, finite
    assert all(np.isfinite(v).all() for v in _adapters(out).values())


def test_resume_needs_a_saved_run(tiny_model, smoke_data, tmp_path):
    from mlx_sdft.errors import InputError

    with pytest.raises(InputError, match="--resume: .* holds no saved run"):
        run_train(
            load_config(None, _opts(tiny_model, smoke_data, tmp_path / "none", resume=True)),
            quiet=True,
        )


def test_dry_run_and_preflight(tiny_model, smoke_data, tmp_path):
    from mlx_sdft.errors import InputError

    out = tmp_path / "m"
    parts = run_train(
        load_config(None, _opts(tiny_model, smoke_data, out, dry_run=True)), quiet=True
    )
    assert 0 < parts["peak"] < 1 and parts["logits"] > 0 and not out.exists()
    with pytest.raises(InputError, match=r"needs about .* GB but the system RAM is .*--batch-size"):
        run_train(
            load_config(
                None,
                _opts(
                    tiny_model,
                    smoke_data,
                    out,
                    batch_size=100000,
                    max_completion_length=4000,
                    max_seq_length=8192,
                ),
            ),
            quiet=True,
        )
    assert not out.exists()


def test_preflight_samples_unfused_when_only_that_fits(tmp_path, monkeypatch):
    """The fused copy of the weights is the first thing to give up when memory is short."""
    from mlx_sdft.machine import memory
    from mlx_sdft.config import Config
    from mlx_sdft.jobs.train import preflight
    from mlx_sdft.core.prompts import PromptPair

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from shapes import SMOLLM2

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(538_000_000)  # float32 SmolLM2-135M; sparse, nothing is read
    pairs = [PromptPair([1] * 64, [1] * 160, [2] * 8, "x:1")]
    opts = dict(
        batch_size=1,
        max_completion_length=16,
        num_layers=-1,
        lora_parameters={"rank": 8, "scale": 20.0, "dropout": 0.0},
    )
    fused = memory.estimate(SMOLLM2, tmp_path, Config(**opts), 64, 160, 8)
    unfused = memory.estimate(SMOLLM2, tmp_path, Config(**opts, fuse_sampling=False), 64, 160, 8)
    assert (
        0.4 < fused["fused_copy"] < 0.5 and unfused["fused_copy"] == 0
    )  # 30 blocks of 3.5M float32 weights
    assert fused["peak"] > unfused["peak"]
    monkeypatch.setattr(
        memory, "available_gb", lambda: ((fused["peak"] + unfused["peak"]) / 2, "test memory")
    )
    cfg = Config(**opts)
    resolved, parts = preflight(cfg, tmp_path, pairs, [])
    assert parts["peak"] == unfused["peak"] and resolved.fuse_sampling is False
    assert cfg == Config(**opts)  # the caller's options are left as they were
    cfg = Config(**opts, method="sft")
    assert (
        memory.estimate(SMOLLM2, tmp_path, cfg, 64, 160)["fused_copy"] == 0
    )  # SFT does not sample
    monkeypatch.setattr(memory, "available_gb", lambda: (unfused["peak"] / 2, "test memory"))
    with pytest.raises(InputError, match="needs about"):
        preflight(Config(**opts), tmp_path, pairs, [])


def test_preflight_scores_in_chunks_when_only_that_fits(tmp_path, monkeypatch):
    from mlx_sdft.machine import memory
    from mlx_sdft.config import Config
    from mlx_sdft.jobs.train import AUTO_CHUNK, preflight
    from mlx_sdft.core.prompts import PromptPair

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from shapes import SMOLLM2

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(538_000_000)
    pairs = [PromptPair([1] * 64, [1] * 160, [2] * 8, "x:1")]
    opts = dict(
        batch_size=8, max_completion_length=1024, fuse_sampling=False, completion_budget=0.0
    )  # 1024 tokens each
    whole = memory.estimate(SMOLLM2, tmp_path, Config(**opts), 64, 160, 8)
    chunked = memory.estimate(
        SMOLLM2, tmp_path, Config(**opts, logits_chunk=AUTO_CHUNK), 64, 160, 8
    )
    assert (
        whole["logits"] > 7 and chunked["logits"] < 0.6
    )  # 8 × 1024 × 49152 float32 logits, 5 copies
    monkeypatch.setattr(
        memory, "available_gb", lambda: ((whole["peak"] + chunked["peak"]) / 2, "test memory")
    )
    cfg = Config(**opts)
    resolved, parts = preflight(cfg, tmp_path, pairs, [])
    assert (
        parts["peak"] == chunked["peak"]
        and resolved.logits_chunk == AUTO_CHUNK
        and cfg == Config(**opts)
    )
    # A model whose LM head cannot be split off cannot score in chunks: said before anything loads.
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2, "model_type": "phi3"}))
    with pytest.raises(InputError, match="--logits-chunk: the LM head of a 'phi3' model"):
        preflight(Config(**opts, logits_chunk=8), tmp_path, pairs, [])


def test_estimate_counts_the_sft_term(tmp_path):
    """--sft-weight (on by default) runs the student over prompt + demonstration in the same backward:
    its activations and its [B, D, V] logits, log-softmax and gradient are in the peak."""
    from mlx_sdft.machine import memory
    from mlx_sdft.config import Config

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from shapes import SMOLLM2

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    opts = dict(batch_size=2, max_completion_length=64, fuse_sampling=False)
    on = memory.estimate(SMOLLM2, tmp_path, Config(**opts), 64, 160, 20)
    off = memory.estimate(SMOLLM2, tmp_path, Config(**opts, sft_weight=0.0), 64, 160, 20)
    h, i, layers, V = (
        SMOLLM2[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    )
    assert on["sft_term"] == pytest.approx(
        2 * (84 * layers * (12 * h + 3 * i) + 3 * 20 * V) * 4 / 1e9
    )
    assert off["sft_term"] == 0 and on["peak"] == pytest.approx(off["peak"] + on["sft_term"])
    assert (
        memory.estimate(SMOLLM2, tmp_path, Config(**opts, method="sft"), 64, 160, 20)["sft_term"]
        == 0
    )


def test_estimate_is_logged_next_to_the_measured_peak(tiny_model, smoke_data, tmp_path):
    out = tmp_path / "p"
    run_train(load_config(None, _opts(tiny_model, smoke_data, out, iters=1)), quiet=True)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["estimated_peak_gb"] > 0 and record["peak_memory_gb"] > 0


def test_offline_hub_id_fails_fast(monkeypatch):
    from mlx_sdft.errors import InputError
    from mlx_sdft.formats.models import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tic = time.time()
    with pytest.raises(InputError, match="someone/not-a-cached-model: could not get the model"):
        resolve("someone/not-a-cached-model")
    assert time.time() - tic < 10


def test_a_save_killed_after_its_commit_is_rolled_forward(
    tiny_model, smoke_data, tmp_path, monkeypatch
):
    """Kill (simulated) between the commit record and the renames: recover() finishes the save."""
    import os as _os

    import mlx_sdft.jobs.train as launch

    out = tmp_path / "r"
    monkeypatch.setattr(
        launch, "StopFlag", lambda reporter: _Ctx(StopAt(2))
    )  # saved at step 2 of 3
    with pytest.raises(Interrupted):
        run_train(load_config(None, _opts(tiny_model, smoke_data, out, iters=3)), quiet=True)
    monkeypatch.undo()
    assert assert_consistent(out) == 2
    real_replace, calls = _os.replace, {"n": 0}

    def dying_replace(src, dst):
        if _os.path.basename(str(src)).startswith(".pending-"):  # the renames after the commit
            calls["n"] += 1
            if calls["n"] > 1:
                raise KeyboardInterrupt(
                    "killed mid-rename"
                )  # stands in for SIGKILL: nothing after runs
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run_train(
            load_config(None, _opts(tiny_model, smoke_data, out, iters=3, resume=True)), quiet=True
        )
    monkeypatch.undo()
    assert (out / checkpoint.COMMIT).exists() and list(
        out.glob(".pending-*")
    )  # a half-renamed save
    assert assert_consistent(out) == 3  # rolled forward, every file at step 3


def test_estimate_sizes_completions_by_what_the_run_may_sample(tmp_path, monkeypatch):
    """The estimate sized every completion at --max-completion-length (1024), while with
    --completion-budget (2 by default) an example samples at most max(16, 2 x its demonstration)
    tokens, and SFT trains on the demonstrations: 11.07 GB estimated for a run on 14-token
    demonstrations that peaked at 1.22 GB, so a machine with less memory chunked, or refused, a
    run that fits. Now the longest completion the run can have is what is counted."""
    from mlx_sdft.machine import memory
    from mlx_sdft.config import Config
    from mlx_sdft.jobs.train import preflight
    from mlx_sdft.core.prompts import PromptPair

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from shapes import SMOLLM2

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(538_000_000)
    pairs = [
        PromptPair([1] * 64, [1] * 160, [2] * 10, "x:1"),
        PromptPair([1] * 64, [1] * 160, [2] * 14, "x:2"),
    ]
    V, n = SMOLLM2["vocab_size"], 4
    monkeypatch.setattr(memory, "available_gb", lambda: (3.0, "test memory"))
    cfg = Config(batch_size=n)  # budget 2: the longest completion is 2 x 14 = 28 tokens, not 1024
    resolved, parts = preflight(cfg, tmp_path, pairs, [])
    assert resolved == cfg  # nothing given up: it fits
    assert parts["logits"] == pytest.approx(n * 28 * V * 4 * 5 / 1e9)
    assert parts["kv_cache"] < 0.05 and parts["peak"] < 3.0
    # The budget's floor of 16 tokens, and the cap above it.
    short = [PromptPair([1] * 64, [1] * 160, [2] * 3, "x:1")]
    assert preflight(cfg, tmp_path, short, [])[1]["logits"] == pytest.approx(
        n * 16 * V * 4 * 5 / 1e9
    )
    capped = Config(batch_size=n, max_completion_length=20)
    assert preflight(capped, tmp_path, pairs, [])[1]["logits"] == pytest.approx(
        n * 20 * V * 4 * 5 / 1e9
    )
    # SFT scores the demonstrations: the longest is what its logits hold.
    sft = Config(batch_size=n, method="sft")
    assert preflight(sft, tmp_path, pairs, [])[1]["logits"] == pytest.approx(
        n * 14 * V * 4 * 3 / 1e9
    )
    # Without the budget every completion may run to the cap: that run does not fit in 3 GB.
    with pytest.raises(InputError, match="needs about"):
        preflight(Config(batch_size=n, completion_budget=0), tmp_path, pairs, [])


def test_a_run_saved_with_a_retired_option_resumes(
    tiny_model, smoke_data, tmp_path, capsys, monkeypatch
):
    """A run folder from a release that had --compiled-decode (its adapter_config.json holds the key,
    here on) resumes to the end: the option is named once and ignored, not refused."""
    import mlx_sdft.jobs.train as launch

    out = tmp_path / "old"
    monkeypatch.setattr(launch, "StopFlag", lambda reporter: _Ctx(StopAt(1)))
    with pytest.raises(Interrupted):
        run_train(load_config(None, _opts(tiny_model, smoke_data, out, iters=2)), quiet=True)
    monkeypatch.undo()
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "compiled_decode": True}))
    capsys.readouterr()
    run_train(
        load_config(None, _opts(tiny_model, smoke_data, out, iters=2, resume=True)), quiet=True
    )
    assert capsys.readouterr().err.count("compiled_decode: deprecated and ignored") == 1
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
