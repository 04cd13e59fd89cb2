"""Runs that reuse a folder or a stage: a new run never mixes with an old one, --resume continues
only the saved run, and continual stages rerun only when asked."""

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import ROOT
from mlx_sdft.cli import app
from mlx_sdft.errors import InputError

runner = CliRunner()


def _train(tiny_model, smoke_data, out, *args):
    return runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--data",
            str(smoke_data),
            "--adapter-path",
            str(out),
            "--num-layers",
            "-1",
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--max-completion-length",
            "6",
            "--val-batches",
            "1",
            *map(str, args),
        ],
    )


def _error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, lines[0]), lines[0]


def _snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.fixture
def earlier(tiny_model, smoke_data, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_model, smoke_data, out, "--save-every", "1").exit_code == 0
    return out


def test_a_new_run_into_a_used_folder_stops_and_writes_nothing(tiny_model, smoke_data, earlier):
    before = _snapshot(earlier)
    _error(
        _train(tiny_model, smoke_data, earlier, "--seed", "1"),
        r"--adapter-path: .*run holds an earlier run; continue it with --resume, or pass --overwrite",
    )
    assert _snapshot(earlier) == before


def test_overwrite_clears_the_earlier_run_first(tiny_model, smoke_data, earlier):
    (earlier / "notes.txt").write_text("mine")  # not a run file: kept
    assert (earlier / "0000001_adapters.safetensors").exists()
    result = _train(
        tiny_model, smoke_data, earlier, "--overwrite", "--iters", "1", "--save-every", "5"
    )
    assert result.exit_code == 0, result.output
    assert not (
        earlier / "0000001_adapters.safetensors"
    ).exists()  # the old run's checkpoint is gone
    records = [json.loads(line) for line in (earlier / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1]  # only the new run's records
    assert json.loads((earlier / "trainer_state.json").read_text())["step"] == 1
    assert (earlier / "notes.txt").read_text() == "mine"
    _error(
        _train(tiny_model, smoke_data, earlier, "--overwrite", "--resume"),
        r"--overwrite: cannot be combined with --resume",
    )


def test_overwrite_deletes_only_the_runs_files(tiny_model, smoke_data, tmp_path):
    """A folder of the user's is not a run: files that only resemble a run's (a copy of the
    adapters kept by hand) neither block a new run nor are deleted by --overwrite; the run's own
    files all go, completions.jsonl included (a new run would append to it)."""
    out = tmp_path / "mine"
    out.mkdir()
    keep = {
        "best_adapters.safetensors": b"x",
        "notes.txt": b"mine",
        "metrics.jsonl.bak": b"y",
        ".tmp-notes": b"z",
    }
    for name, data in keep.items():
        (out / name).write_bytes(data)
    assert (
        _train(
            tiny_model, smoke_data, out, "--steps-per-report", "1", "--save-every", "1"
        ).exit_code
        == 0
    )
    assert (
        len((out / "completions.jsonl").read_text().splitlines()) == 4
    )  # 2 steps x --log-completions 2
    result = _train(tiny_model, smoke_data, out, "--overwrite", "--iters", "1", "--save-every", "5")
    assert result.exit_code == 0, result.output
    assert [
        json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()
    ] == [1, 1]
    assert not (out / "0000002_adapters.safetensors").exists()
    assert {name: (out / name).read_bytes() for name in keep} == keep


def test_an_adapter_path_that_is_a_file_stops_before_training(tiny_model, smoke_data, tmp_path):
    """Not a FileExistsError after the whole run has trained."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text("mine")
    _error(
        _train(tiny_model, smoke_data, demos),
        r"--adapter-path: .*demos.jsonl is a file; this option names a folder to write into",
    )
    for command, why in (
        (
            "eval",
            "this option names a folder to write into",
        ),  # their --output, likewise before any work
        ("check", r"give a \.json file to write, or a folder to write check\.json in"),
    ):
        _error(
            runner.invoke(
                app,
                [
                    command,
                    "--model",
                    str(tiny_model),
                    "--data",
                    str(smoke_data),
                    "--output",
                    str(demos),
                ],
            ),
            rf"--output: .*demos.jsonl is a file; {why}",
        )
    assert demos.read_text() == "mine"


def test_resume_lists_every_changed_option(tiny_model, smoke_data, earlier):
    before = _snapshot(earlier)
    _error(
        _train(
            tiny_model,
            smoke_data,
            earlier,
            "--resume",
            "--method",
            "sft",
            "--batch-size",
            "4",
            "--learning-rate",
            "2e-5",
        ),
        r"--resume: .*run was trained with other options: --method 'sdft' → 'sft'; --batch-size 2 → 4; "
        r"--learning-rate 1e-05 → 2e-05 \(resume with the saved ones",
    )
    # A long value shows where it differs: another data path is not two equal-looking prefixes.
    _error(
        _train(tiny_model, smoke_data, earlier, "--resume", "--data", smoke_data / "train.jsonl"),
        rf"--data '{re.escape(str(smoke_data))}' → '{re.escape(str(smoke_data / 'train.jsonl'))}' \(resume",
    )
    # A finished run too: a new learning rate is not silently ignored.
    _error(
        _train(tiny_model, smoke_data, earlier, "--resume", "--learning-rate", "1e-3"),
        r"--learning-rate 1e-05 → 0.001",
    )
    assert _snapshot(earlier) == before


def test_resume_refuses_data_that_changed_since_the_save(tiny_model, smoke_data, tmp_path):
    """The same --data path with other contents is another run: the resumed steps would visit
    other examples (the batch order depends on their number) without a word."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(smoke_data, data)
    out = tmp_path / "run"
    assert _train(tiny_model, data, out, "--iters", "1").exit_code == 0
    with open(data / "train.jsonl", "a") as fid:
        fid.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "Capital of Peru?"},
                        {"role": "assistant", "content": "Lima."},
                    ]
                }
            )
            + "\n"
        )
    before = _snapshot(out)
    _error(
        _train(tiny_model, data, out, "--iters", "1", "--resume"),
        r"--resume: the training data of .*run changed since it was saved",
    )
    assert _snapshot(out) == before


def test_resume_may_change_reporting_options(tiny_model, smoke_data, tmp_path, monkeypatch):
    import mlx_sdft.jobs.train as launch
    from mlx_sdft.config import load_config
    from mlx_sdft.errors import Interrupted
    from test_resume import StopAt, _Ctx

    out = tmp_path / "r"
    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        iters=3,
        batch_size=2,
        max_completion_length=6,
        val_batches=1,
        save_every=1,
    )
    monkeypatch.setattr(launch, "StopFlag", lambda reporter: _Ctx(StopAt(1)))
    with pytest.raises(Interrupted):
        launch.run_train(load_config(None, opts), quiet=True)
    monkeypatch.undo()
    record = launch.run_train(
        load_config(
            None,
            {
                **opts,
                "resume": True,
                "steps_per_report": 3,
                "save_every": 2,
                "log_completions": 0,
                "steps_per_eval": 5,
                "val_batches": 2,
                "grad_checkpoint": True,
                "data": str(smoke_data) + "/",
            },
        ),
        quiet=True,
    )
    assert record["step"] == 3


def test_resume_keeps_the_options_an_old_run_was_trained_with(
    tiny_model, smoke_data, tmp_path, monkeypatch
):
    """A run saved before the guards' defaults (--skip-first-tokens 3, no guard options in its adapter_config.json)
    resumed with the same command plus --resume goes on with those values, not today's defaults:
    its adapters equal an uninterrupted run of the paper's objective. Giving a new default
    explicitly is refused, as any changed option is."""
    import mlx.core as mx
    import numpy as np

    import mlx_sdft.jobs.train as launch
    from mlx_sdft.config import PAPER_SDFT, load_config
    from mlx_sdft.errors import Interrupted
    from test_resume import StopAt, _Ctx

    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        num_layers=-1,
        iters=3,
        batch_size=2,
        max_completion_length=6,
        val_batches=1,
        save_every=1,
        learning_rate=1e-2,
    )
    launch.run_train(
        load_config(None, {**opts, **PAPER_SDFT, "adapter_path": str(tmp_path / "ref")}), quiet=True
    )
    old = tmp_path / "old"
    monkeypatch.setattr(launch, "StopFlag", lambda reporter: _Ctx(StopAt(1)))
    with pytest.raises(Interrupted):
        launch.run_train(
            load_config(None, {**opts, **PAPER_SDFT, "adapter_path": str(old)}), quiet=True
        )
    monkeypatch.undo()
    saved = json.loads((old / "adapter_config.json").read_text())
    for key in (
        "completion_budget",
        "truncated",
        "sft_weight",
        "base_kl_weight",
        "max_degenerate_rise",
    ):
        del saved[key]  # as written before the guards existed
    (old / "adapter_config.json").write_text(json.dumps(saved))

    given = {
        **opts,
        "adapter_path": str(old),
        "resume": True,
    }  # no --skip-first-tokens, no guard option
    cfg = load_config(None, given)
    assert {k: getattr(cfg, k) for k in PAPER_SDFT} == {**PAPER_SDFT, "completion_budget": None}
    before = _snapshot(old)
    with pytest.raises(
        InputError, match=r"--resume: .* other options: --sft-weight 0.0 → 0.5 \(resume with"
    ):
        launch.run_train(load_config(None, {**given, "sft_weight": 0.5}), quiet=True)
    with pytest.raises(InputError, match=r"other options: --skip-first-tokens 3 → 0 \(resume with"):
        launch.run_train(load_config(None, {**given, "skip_first_tokens": 0}), quiet=True)
    assert _snapshot(old) == before
    assert launch.run_train(cfg, quiet=True)["step"] == 3
    resumed, reference = (
        mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("old", "ref")
    )
    for k in reference:
        np.testing.assert_array_equal(np.array(resumed[k]), np.array(reference[k]))
    # Without a saved run there is nothing to keep: today's defaults, and run_train says none is saved.
    fresh = load_config(None, {**opts, "adapter_path": str(tmp_path / "none"), "resume": True})
    assert (fresh.skip_first_tokens, fresh.sft_weight) == (0, 0.5)


def _stages(tmp_path, tiny_model, **stage_two):
    stages = {
        "model": str(tiny_model),
        "output": str(tmp_path / "run"),
        "methods": ["sft"],
        "iters": 1,
        "batch_size": 2,
        "num_layers": -1,
        "max_completion_length": 4,
        "val_batches": 1,
        "eval": {"max_tokens": 4, "num_general_prompts": 2, "retention_max_tokens": 4},
        "stages": [
            {"name": "capitals", "data": str(ROOT / "recipes/smoke/data")},
            {"name": "opposites", "data": str(ROOT / "recipes/continual/opposites"), **stage_two},
        ],
    }
    path = tmp_path / "stages.yaml"
    path.write_text(json.dumps(stages))
    return path


def test_continual_refuses_a_changed_finished_stage_and_reruns_on_request(tiny_model, tmp_path):
    from mlx_sdft.jobs.continual import run_continual

    run_continual(str(_stages(tmp_path, tiny_model)), console=Console(file=io.StringIO()))
    two = tmp_path / "run/sft/02-opposites/adapters.safetensors"
    stamp = two.stat().st_mtime_ns
    log = io.StringIO()
    run_continual(str(_stages(tmp_path, tiny_model)), console=Console(file=log, width=200))
    assert "base model: skipped (evaluated, unchanged)" in log.getvalue()
    assert "sft: stage 1/2 capitals: skipped (finished, unchanged)" in log.getvalue()
    assert "sft: stage 2/2 opposites: skipped (finished, unchanged)" in log.getvalue()

    changed = _stages(tmp_path, tiny_model, learning_rate=5e-4)
    with pytest.raises(
        InputError,
        match=r"sft: stage 'opposites' finished with other options or data .* "
        r"--restart-from opposites",
    ):
        run_continual(str(changed), console=Console(file=io.StringIO()))
    assert two.stat().st_mtime_ns == stamp  # refused before anything trained
    result = runner.invoke(app, ["continual", "-c", str(changed), "--restart-from", "nope"])
    _error(result, r"--restart-from: no stage 'nope'")

    log = io.StringIO()
    run_continual(str(changed), console=Console(file=log, width=200), restart_from="opposites")
    assert "stage 1/2 capitals: skipped" in log.getvalue() and two.stat().st_mtime_ns != stamp
    assert (
        json.loads((tmp_path / "run/sft/02-opposites/adapter_config.json").read_text())[
            "learning_rate"
        ]
        == 5e-4
    )
    run_continual(
        str(changed), console=Console(file=io.StringIO())
    )  # now unchanged: nothing to rerun


def test_continual_notices_changed_data(tiny_model, tmp_path):
    import shutil

    from mlx_sdft.jobs.continual import run_continual

    data = tmp_path / "caps"
    shutil.copytree(ROOT / "recipes/smoke/data", data)
    path = _stages(tmp_path, tiny_model)
    spec = json.loads(path.read_text())
    spec["stages"][0]["data"] = str(data)
    path.write_text(json.dumps(spec))
    run_continual(str(path), console=Console(file=io.StringIO()))
    with open(data / "train.jsonl", "a") as fid:
        fid.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "Capital of Peru?"},
                        {"role": "assistant", "content": "Lima."},
                    ]
                }
            )
            + "\n"
        )
    base = (tmp_path / "run/base.json").stat().st_mtime_ns
    with pytest.raises(InputError, match=r"stage 'capitals' finished with other options or data"):
        run_continual(str(path), console=Console(file=io.StringIO()))
    log = io.StringIO()
    run_continual(str(path), console=Console(file=log, width=200), restart_from="capitals")
    assert (
        "evaluating the base model on every task" in log.getvalue()
    )  # its tasks' data changed too
    assert (tmp_path / "run/base.json").stat().st_mtime_ns != base


def test_continual_stages_finished_before_the_new_defaults(tiny_model, tmp_path):
    """A stage finished with the paper's objective (the defaults before the guards'): rerun under
    today's defaults, an SDFT stage would train otherwise and is refused (the stages file can pin
    the old options, or --restart-from retrains it); an SFT stage, which those options do not
    touch, stays finished."""
    from mlx_sdft.config import PAPER_SDFT
    from mlx_sdft.jobs.continual import run_continual

    def stages(methods, **options):
        path = tmp_path / "stages.yaml"
        path.write_text(
            json.dumps(
                {
                    "model": str(tiny_model),
                    "output": str(tmp_path / "run"),
                    "methods": methods,
                    "iters": 1,
                    "batch_size": 2,
                    "num_layers": -1,
                    "max_completion_length": 4,
                    "val_batches": 1,
                    **options,
                    "eval": {"max_tokens": 4, "num_general_prompts": 2, "retention_max_tokens": 4},
                    "stages": [{"name": "capitals", "data": str(ROOT / "recipes/smoke/data")}],
                }
            )
        )
        return str(path)

    run_continual(stages(["sdft", "sft"], **PAPER_SDFT), console=Console(file=io.StringIO()))
    with pytest.raises(InputError, match=r"sdft: stage 'capitals' finished with other options"):
        run_continual(stages(["sdft", "sft"]), console=Console(file=io.StringIO()))
    log = io.StringIO()
    run_continual(stages(["sdft", "sft"], **PAPER_SDFT), console=Console(file=log, width=200))
    run_continual(stages(["sft"]), console=Console(file=log, width=200))
    assert log.getvalue().count("sdft: stage 1/1 capitals: skipped (finished, unchanged)") == 1
    assert log.getvalue().count("sft: stage 1/1 capitals: skipped (finished, unchanged)") == 2


def test_a_run_into_a_folder_in_use_names_the_running_one_and_writes_nothing(
    tiny_model, smoke_data, tmp_path
):
    """The lock on --adapter-path, held here by this process: a run into the folder stops with one line
    naming the holder's pid (exit 2) and touches nothing. A lock left by a killed run (its pid in the
    file, the flock gone with the process) is taken over, and said."""
    import os

    from mlx_sdft.formats import checkpoint

    out = tmp_path / "run"
    with checkpoint.locked(out):
        before = _snapshot(out)
        assert before == {"train.lock": f"{os.getpid()}\n".encode()}
        _error(
            _train(tiny_model, smoke_data, out),
            rf"--adapter-path: .*run is in use by a train run that is still running \(pid {os.getpid()}\); wait for it",
        )
        assert _snapshot(out) == before
    (out / "train.lock").write_text("999999999\n")  # what a run killed by SIGKILL leaves
    result = _train(tiny_model, smoke_data, out)
    assert result.exit_code == 0, result.output
    assert "from pid 999999999, a run that did not finish" in " ".join(result.output.split())
    assert (out / "train.lock").read_text() == "" and (out / "adapters.safetensors").exists()


def test_two_runs_into_one_folder_the_second_stops_and_the_first_goes_on(
    tiny_model, smoke_data, tmp_path
):
    """Two real runs: the second into the folder of a running one (a fresh folder when both started)
    gets one line naming the first's pid, exit 2; the first trains on and saves as if alone."""
    import signal
    import subprocess
    import time

    from test_resume import _cli, assert_consistent

    out = tmp_path / "run"
    first = subprocess.Popen(
        _cli(tiny_model, smoke_data, out, "--iters", "400"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while (
            first.poll() is None
            and not (out / "trainer_state.json").exists()
            and time.time() < deadline
        ):
            time.sleep(0.02)
        for extra in ((), ("--resume",), ("--overwrite",)):
            _error(
                _train(tiny_model, smoke_data, out, *extra),
                rf"is in use by a train run .*\(pid {first.pid}\)",
            )
        assert (
            first.poll() is None and (out / "train.lock").read_text() == f"{first.pid}\n"
        )  # undisturbed
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: it saves and stops
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert assert_consistent(out) >= 1 and (out / "train.lock").read_text() == ""
