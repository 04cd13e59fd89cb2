"""The paper's recipes (recipes/tooluse, recipes/science): converters and evaluators, offline.

The fixtures in tests/data/paper/ were written for this project in the shape of the official
release's records (made-up APIs and questions, no real dataset rows).
"""

import importlib.util
import io
import json
import shutil
import sys
import urllib.error
from pathlib import Path

import pytest

from mlx_sdft.core.data import load_dataset, load_examples
from mlx_sdft.core.metrics import resolve_metric

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "paper"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool_prep = _load("tooluse_prepare", REPO / "recipes/tooluse/prepare.py")
tool_metric = _load("tooluse_metric_t", REPO / "recipes/tooluse/metric.py")
sci_prep = _load("science_prepare", REPO / "recipes/science/prepare.py")
sci_metric = _load("science_metric_t", REPO / "recipes/science/metric.py")


def _records(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def _pairs(golden_answer) -> list[tuple[str, str]]:
    if isinstance(golden_answer, dict):
        return list(zip(golden_answer["Action"], golden_answer["Action_Input"]))
    return [(item["Action"], item["Action_Input"]) for item in golden_answer]


# ---- tool use: converter ---------------------------------------------------------------------


def test_tooluse_prepare_writes_demonstrations_and_gold(tmp_path, capsys):
    assert (
        tool_prep.main(
            ["--source", str(FIXTURES / "tooluse"), "--out", str(tmp_path), "--valid-fraction", "0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train.jsonl 6" in out and "test.jsonl 3" in out
    assert (
        "note: 1 demonstration" in out
    )  # the fixture's last record asks for 5 paints, its gold for 3
    assert not (tmp_path / "valid.jsonl").exists()

    train = _records(FIXTURES / "tooluse/train_data.json")
    examples = load_examples(tmp_path / "train.jsonl")
    assert len(examples) == len(train)
    for example, record in zip(examples, train):
        assert example.prompt == [
            {"role": "user", "content": record["prompt"]}
        ]  # no system message
        assert example.demonstration == "\n".join(record["golden_response"])  # the official join

    evaluation = _records(FIXTURES / "tooluse/eval_data.jsonl")
    tests = load_examples(tmp_path / "test.jsonl")
    for example, record in zip(tests, evaluation):
        assert example.prompt[-1]["content"] == record["prompt"]
        pairs = _pairs(record["golden_answer"])
        assert tool_metric.reference_gold(example.demonstration) == tool_metric.gold_from_answer(
            pairs
        )


def test_tooluse_prepare_holds_out_a_seeded_valid_slice(tmp_path, capsys):
    args = ["--source", str(FIXTURES / "tooluse"), "--valid-fraction", "0.34"]
    assert tool_prep.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert tool_prep.main([*args, "--out", str(tmp_path / "b")]) == 0
    data = load_dataset(tmp_path / "a")
    assert [len(data[s]) for s in ("train", "valid", "test")] == [4, 2, 3]
    demos = sorted(ex.demonstration for s in ("train", "valid") for ex in data[s])
    assert demos == sorted(
        "\n".join(r["golden_response"]) for r in _records(FIXTURES / "tooluse/train_data.json")
    )
    for split in ("train", "valid", "test"):  # same seed, same files
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{split}.jsonl"
        ).read_bytes()


def test_tooluse_prepare_accepts_a_clone_of_the_repository(tmp_path, capsys):
    shutil.copytree(FIXTURES / "tooluse", tmp_path / "clone/data/tooluse_data")
    assert (
        tool_prep.main(["--source", str(tmp_path / "clone"), "--out", str(tmp_path / "out")]) == 0
    )
    assert (tmp_path / "out/test.jsonl").exists()


def _write(path: Path, records, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "breakage, where, field",
    [
        (
            lambda t, e: t[1].pop("golden_response"),
            "train_data.json[1]",
            '"golden_response" is missing',
        ),
        (
            lambda t, e: t[0].update(prompt=""),
            "train_data.json[0]",
            '"prompt" must be a non-empty string',
        ),
        (
            lambda t, e: t[2].update(golden_response=[1, 2]),
            "train_data.json[2]",
            '"golden_response" must be a list of strings',
        ),
        (
            lambda t, e: t[0]["golden_answer"]["Action_Input"].append("{}"),
            "train_data.json[0]",
            "differ in length",
        ),
        (
            lambda t, e: e[1]["golden_answer"][0].pop("Action_Input"),
            "eval_data.jsonl:2",
            '"golden_answer[0].Action_Input" must be a string',
        ),
        (lambda t, e: e[0].pop("golden_answer"), "eval_data.jsonl:1", '"golden_answer" is missing'),
        (
            lambda t, e: e[2].update(golden_answer=[]),
            "eval_data.jsonl:3",
            '"golden_answer" has no actions',
        ),
    ],
)
def test_tooluse_prepare_bad_field_is_one_line_naming_record_and_field(
    tmp_path, capsys, breakage, where, field
):
    train = _records(FIXTURES / "tooluse/train_data.json")
    evaluation = _records(FIXTURES / "tooluse/eval_data.jsonl")
    breakage(train, evaluation)
    _write(tmp_path / "src/train_data.json", train)
    _write(tmp_path / "src/eval_data.jsonl", evaluation, jsonl=True)
    assert tool_prep.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert err.startswith("prepare.py: error: ") and where in err and field in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_tooluse_prepare_missing_split_and_bad_json(tmp_path, capsys):
    _write(tmp_path / "src/train_data.json", _records(FIXTURES / "tooluse/train_data.json"))
    assert tool_prep.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "has no eval_data/" in _error(capsys)
    (tmp_path / "src/eval_data.jsonl").write_text('{"prompt": "x"}\n{not json\n')
    assert tool_prep.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "eval_data.jsonl:2: invalid JSON" in _error(capsys)
    assert tool_prep.main(["--source", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in _error(capsys)


def _serve(monkeypatch, module, files: dict[str, bytes]) -> list[str]:
    """Replace the fetch that the module's Remote calls (recipes/official_data.py's) with a dict of URL -> bytes;
    returns the URLs asked for."""
    asked = []

    def fetch(url):
        asked.append(url)
        if url not in files:
            raise module.NotFound(f"{url}: not found (HTTP 404)")
        return files[url]

    monkeypatch.setattr(module.official_data, "fetch", fetch)
    return asked


def test_tooluse_prepare_downloads_from_github_with_lfs(tmp_path, monkeypatch, capsys):
    raw = "https://raw.githubusercontent.com/someone/sdft/abc123/data/tooluse_data"
    media = "https://media.githubusercontent.com/media/someone/sdft/abc123/data/tooluse_data"
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 10\n"
    asked = _serve(
        monkeypatch,
        tool_prep,
        {
            f"{raw}/train_data.json": (FIXTURES / "tooluse/train_data.json").read_bytes(),
            f"{raw}/eval_data.jsonl": pointer,  # stored with Git LFS: the content is on media.githubusercontent.com
            f"{media}/eval_data.jsonl": (FIXTURES / "tooluse/eval_data.jsonl").read_bytes(),
        },
    )
    assert tool_prep.main(["--source", "github:someone/sdft@abc123", "--out", str(tmp_path)]) == 0
    assert asked[0] == f"{raw}/train_data/state.json"  # the save_to_disk folder is tried first
    assert f"{media}/eval_data.jsonl" in asked
    assert len(load_examples(tmp_path / "test.jsonl")) == 3
    assert tool_prep.OFFICIAL.startswith("github:idanshen/Self-Distillation@")


def test_fetch_maps_http_errors(monkeypatch):
    def not_found(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, io.BytesIO())

    def offline(request, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tool_prep.official_data.urllib.request, "urlopen", not_found)
    with pytest.raises(tool_prep.NotFound):
        tool_prep.fetch("https://example.invalid/x")
    monkeypatch.setattr(tool_prep.official_data.urllib.request, "urlopen", offline)
    with pytest.raises(
        tool_prep.PrepareError, match="cannot download .*--source with a local copy"
    ):
        tool_prep.fetch("https://example.invalid/x")


def _save_to_disk(folder: Path, records: list[dict]) -> None:
    """A folder shaped like datasets' save_to_disk: state.json + an Arrow IPC stream."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    with pa.ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )


def test_tooluse_prepare_reads_the_official_arrow_folders(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    train = _records(
        FIXTURES / "tooluse/train_data.json"
    )  # golden_answer: struct of lists, as in the release
    evaluation = _records(FIXTURES / "tooluse/eval_data.jsonl")  # golden_answer: list of structs
    _save_to_disk(tmp_path / "src/train_data", train)
    _save_to_disk(tmp_path / "src/eval_data", evaluation)
    assert [
        r for _, r in tool_prep.load_records(tool_prep.Local(tmp_path / "src"), "train_data")
    ] == train
    args = [
        "--source",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "out"),
        "--valid-fraction",
        "0",
    ]
    assert tool_prep.main(args) == 0
    assert [ex.demonstration for ex in load_examples(tmp_path / "out/train.jsonl")] == [
        "\n".join(r["golden_response"]) for r in train
    ]


# ---- tool use: evaluator ---------------------------------------------------------------------

GOLD = tool_metric.render_gold(
    [
        ("listStations", '{"town": "Saltby"}'),
        ("getTides", '{"station": "SB-2", "date": "2030-11-20"}'),
    ]
)


def test_tooluse_score_correct_with_thoughts_and_observations():
    answer = (
        'Thought: I need the station first.\nAction: listStations\nAction Input: {"town": "Saltby"}\n'
        'Observation: ["SB-2"]\nThought: now the tides.\nAction: getTides\n'
        'Action Input: {"station": "SB-2", "date": "2030-11-20"}\nFinal Answer: at 04:12.'
    )
    assert tool_metric.score(answer, GOLD) == 1.0


def test_tooluse_score_ignores_argument_and_action_order():
    answer = (
        'Action: getTides\nAction Input: {"date": "2030-11-20", "station": "SB-2"}\n'
        'Action: listStations\nAction Input: {"town": "Saltby"}'
    )
    assert tool_metric.score(answer, GOLD) == 1.0


def test_tooluse_score_multiset_of_actions():
    args = 'Action Input: {"town": "Saltby", "station": "SB-2", "date": "2030-11-20"}'
    assert (
        tool_metric.score(f"Action: listStations\nAction: getTides\n{args}", GOLD) == 1.0
    )  # merged args compare
    assert tool_metric.score(f"Action: getTides\n{args}", GOLD) == 0.0  # one action missing
    extra = f"Action: listStations\nAction: getTides\nAction: getTides\n{args}"
    assert tool_metric.score(extra, GOLD) == 0.0  # one action too many
    twice = tool_metric.render_gold([("ping", "{}"), ("ping", "{}")])
    assert (
        tool_metric.score("Action: ping\nAction Input: {}\nAction: ping\nAction Input: {}", twice)
        == 1.0
    )
    assert tool_metric.score("Action: ping\nAction Input: {}", twice) == 0.0


def test_tooluse_score_wrong_missing_or_extra_arguments():
    gold = tool_metric.render_gold([("searchBooks", '{"author": "Ursula Vale", "year": 1987}')])
    assert (
        tool_metric.score(
            'Action: searchBooks\nAction Input: {"author": "Ursula Vale", "year": 1987}', gold
        )
        == 1.0
    )
    assert (
        tool_metric.score(
            'Action: searchBooks\nAction Input: {"author": "Ursula Vale", "year": 1988}', gold
        )
        == 0.0
    )
    assert (
        tool_metric.score('Action: searchBooks\nAction Input: {"author": "Ursula Vale"}', gold)
        == 0.0
    )
    assert (
        tool_metric.score(
            'Action: searchBooks\nAction Input: {"author": "Ursula Vale", "year": 1987, "page": 1}',
            gold,
        )
        == 0.0
    )
    as_text = 'Action: searchBooks\nAction Input: {"author": "Ursula Vale", "year": "1987"}'
    assert tool_metric.score(as_text, gold) == 0.0  # "1987" is not 1987


def test_tooluse_score_malformed_output_is_zero():
    gold = tool_metric.render_gold([("searchBooks", '{"author": "Ursula Vale"}')])
    assert tool_metric.score("", gold) == 0.0
    assert tool_metric.score("I would search for books by Ursula Vale.", gold) == 0.0
    assert (
        tool_metric.score("Action: searchBooks\nAction Input: {author: Ursula Vale}", gold) == 0.0
    )  # not JSON
    assert (
        tool_metric.score('Action: searchBooks\nAction Input: {"author": "Ursula Vale"', gold)
        == 0.0
    )  # unclosed
    assert tool_metric.score('Action Input: {"author": "Ursula Vale"}', gold) == 0.0  # no action
    assert (
        tool_metric.score('Action: search-Books\nAction Input: {"author": "Ursula Vale"}', gold)
        == 0.0
    )


def test_tooluse_score_keeps_the_official_quirks():
    # An unparseable input is skipped, so with no gold arguments the action alone decides.
    no_args = tool_metric.render_gold([("randomFact", "{}")])
    assert tool_metric.score("Action: randomFact\nAction Input: {oops}", no_args) == 1.0
    # The official non-greedy {.*?} never reads a nested object from an answer...
    nested = tool_metric.render_gold(
        [("findPaints", '{"filters": {"finish": "satin"}, "limit": 2}')]
    )
    assert tool_metric.reference_gold(nested) == (
        ["findPaints"],
        {"filters": {"finish": "satin"}, "limit": 2},
    )
    assert tool_metric.score(nested, nested) == 0.0
    # ...and an action name stops at the first non-word character.
    assert tool_metric.extract_actions("Action: get-weather") == ["get"]


def test_tooluse_reference_from_a_demonstration():
    record = _records(FIXTURES / "tooluse/train_data.json")[2]
    demo = "\n".join(record["golden_response"])
    assert tool_metric.reference_gold(demo) == tool_metric.gold_from_answer(
        _pairs(record["golden_answer"])
    )
    assert tool_metric.score(demo, demo) == 1.0


def test_tooluse_gold_skips_inputs_that_are_not_json_objects():
    assert tool_metric.gold_from_answer([("a", ""), ("b", "[1]"), ("c", '{"k": 1}')]) == (
        ["a", "b", "c"],
        {"k": 1},
    )
    gold = tool_metric.render_gold([("a", ""), ("b", "[1]"), ("c", '{"k": 1}')])
    assert tool_metric.reference_gold(gold) == (["a", "b", "c"], {"k": 1})


# ---- science: converter ----------------------------------------------------------------------


def test_science_prepare_official_records(tmp_path, capsys):
    assert (
        sci_prep.main(
            ["--source", str(FIXTURES / "science"), "--out", str(tmp_path), "--valid-fraction", "0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train.jsonl 5" in out and "test.jsonl 3" in out
    assert "note: 1 demonstration" in out  # the last fixture demonstration has no <answer> tag

    train = _records(FIXTURES / "science/train_data.jsonl")
    for example, record in zip(load_examples(tmp_path / "train.jsonl"), train, strict=True):
        assert (
            example.prompt == record["messages"]
        )  # system message kept, as the official loader does
        assert example.demonstration == record["output_text"]
    evaluation = _records(FIXTURES / "science/eval_data.json")
    for example, record in zip(load_examples(tmp_path / "test.jsonl"), evaluation, strict=True):
        assert example.prompt == record["prompt"]
        assert example.demonstration == f"<answer>{record['answer']}</answer>"
        assert sci_metric.gold_letter(example.demonstration) == record["answer"]


def test_science_prepare_valid_slice(tmp_path, capsys):
    args = [
        "--source",
        str(FIXTURES / "science"),
        "--out",
        str(tmp_path),
        "--valid-fraction",
        "0.4",
    ]
    assert sci_prep.main(args) == 0
    data = load_dataset(tmp_path)
    assert [len(data[s]) for s in ("train", "valid", "test")] == [3, 2, 3]


def _benchmark_checks(out: Path):
    data = load_dataset(out)
    lines = [ex for split in data.values() for ex in split]
    assert [len(data[s]) for s in ("train", "test")] == [
        6,
        2,
    ] and "valid" not in data  # 8 L3 chemistry MCQs
    rows = {r["question"]: r for r in _records(FIXTURES / "science/sciknoweval_chemistry.jsonl")}
    for ex in lines:
        assert ex.prompt[0] == {"role": "system", "content": sci_prep.SYSTEM_PROMPT}
        question, options = ex.prompt[1]["content"].split("\n\n")
        row = rows[question]
        assert row["details"]["level"] == "L3" and row["domain"] == "Chemistry"
        assert options.splitlines() == [
            f"{l}. {t}" for l, t in zip(row["choices"]["label"], row["choices"]["text"])
        ]
        assert ex.demonstration == f"<answer>{row['answerKey']}</answer>"


def test_science_prepare_benchmark_file(tmp_path, capsys):
    path = FIXTURES / "science/sciknoweval_chemistry.jsonl"
    assert sci_prep.main(["--source", str(path), "--out", str(tmp_path)]) == 0
    _benchmark_checks(tmp_path)


def test_science_prepare_from_the_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def download(**kwargs):
        calls.append(kwargs)
        return str(FIXTURES / "science/sciknoweval_chemistry.jsonl")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert sci_prep.main(["--source", "hf", "--out", str(tmp_path)]) == 0
    assert calls == [
        {
            "repo_id": "hicai-zju/SciKnowEval",
            "filename": "data/Chemistry/sciknoweval_chemistry_test.jsonl",
            "repo_type": "dataset",
            "revision": sci_prep.HF_REVISION,
        }
    ]
    _benchmark_checks(tmp_path)
    assert sci_prep.main(["--source", "hf:someone/copy@v2", "--out", str(tmp_path)]) == 0
    assert calls[-1]["repo_id"] == "someone/copy" and calls[-1]["revision"] == "v2"


def test_science_prepare_hub_failure_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def download(**kwargs):
        raise OSError("offline\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert sci_prep.main(["--source", "hf", "--out", str(tmp_path)]) == 2
    assert "cannot download (OSError: offline)" in _error(capsys)


@pytest.mark.parametrize(
    "breakage, where, field",
    [
        (lambda t, e: t[0].pop("output_text"), "train_data.jsonl:1", '"output_text" is missing'),
        (
            lambda t, e: t[1]["messages"].append({"role": "assistant", "content": "B"}),
            "train_data.jsonl:2",
            '"messages[2].role" must be "user"',
        ),
        (
            lambda t, e: t[2]["messages"][0].pop("content"),
            "train_data.jsonl:3",
            '"messages[0]" must be an object',
        ),
        (lambda t, e: e[1].pop("answer"), "eval_data.json[1]", '"answer" is missing'),
        (
            lambda t, e: e[0].update(prompt=[]),
            "eval_data.json[0]",
            '"prompt" must be a non-empty list of messages',
        ),
    ],
)
def test_science_prepare_bad_field_is_one_line(tmp_path, capsys, breakage, where, field):
    train = _records(FIXTURES / "science/train_data.jsonl")
    evaluation = _records(FIXTURES / "science/eval_data.json")
    breakage(train, evaluation)
    _write(tmp_path / "src/train_data.jsonl", train, jsonl=True)
    _write(tmp_path / "src/eval_data.json", evaluation)
    assert sci_prep.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert where in err and field in err


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda r: r.pop("answerKey"), '"answerKey" is missing'),
        (lambda r: r.update(answerKey="E"), "is not one of choices.label"),
        (lambda r: r.pop("details"), '"details" is missing'),
        (lambda r: r["details"].pop("level"), '"details.level" is missing'),
        (
            lambda r: r["choices"].update(label=["A"]),
            '"choices.label" must be a list of strings, one per choices.text',
        ),
    ],
)
def test_science_prepare_bad_benchmark_record(tmp_path, capsys, breakage, field):
    rows = _records(FIXTURES / "science/sciknoweval_chemistry.jsonl")
    breakage(rows[3])
    path = _write(tmp_path / "chem.jsonl", rows, jsonl=True)
    assert sci_prep.main(["--source", str(path), "--out", str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert "chem.jsonl:4" in err and field in err


def test_science_prepare_benchmark_without_l3_questions(tmp_path, capsys):
    rows = [
        r
        for r in _records(FIXTURES / "science/sciknoweval_chemistry.jsonl")
        if r["details"]["level"] != "L3"
    ]
    path = _write(tmp_path / "chem.jsonl", rows, jsonl=True)
    assert sci_prep.main(["--source", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "no Chemistry L3 multiple-choice records among 1" in _error(capsys)


def test_science_prepare_reads_the_official_arrow_folders(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    _save_to_disk(tmp_path / "src/train_data", _records(FIXTURES / "science/train_data.jsonl"))
    _save_to_disk(tmp_path / "src/eval_data", _records(FIXTURES / "science/eval_data.json"))
    assert sci_prep.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert len(load_examples(tmp_path / "out/test.jsonl")) == 3


# ---- science: evaluator ----------------------------------------------------------------------


def test_science_score_correct_and_incorrect():
    gold = "<answer>B</answer>"
    assert (
        sci_metric.score("<reasoning>\nCO2 + Ca(OH)2.\n</reasoning>\n<answer>\nB\n</answer>", gold)
        == 1.0
    )
    assert sci_metric.score("<answer> B </answer>", gold) == 1.0
    assert sci_metric.score("<reasoning>x</reasoning><answer>C</answer>", gold) == 0.0
    assert (
        sci_metric.score("<answer>b</answer>", gold) == 0.0
    )  # case matters, as in the official code
    assert sci_metric.score("<answer>B) Carbon dioxide</answer>", gold) == 0.0


def test_science_score_missing_or_malformed_answer():
    gold = "<answer>B</answer>"
    assert sci_metric.score("", gold) == 0.0
    assert sci_metric.score("The answer is B.", gold) == 0.0
    assert sci_metric.score("<reasoning>I think B</reasoning>", gold) == 0.0
    assert sci_metric.score("<answer></answer>", gold) == 0.0
    assert sci_metric.score("<answer>B</answer>", "") == 0.0  # an empty gold never matches


def test_science_score_keeps_the_official_quirks():
    gold = "<answer>B</answer>"
    assert sci_metric.score("B", gold) == 1.0  # no tag: the whole answer is compared
    assert (
        sci_metric.score("<answer>A</answer> on second thought <answer>B</answer>", gold) == 1.0
    )  # the last tag
    assert (
        sci_metric.score("<reasoning>...</reasoning><answer>B", gold) == 1.0
    )  # cut off before </answer>


def test_science_gold_from_any_reference():
    demo = _records(FIXTURES / "science/train_data.jsonl")[0]["output_text"]
    assert sci_metric.gold_letter(demo) == "B" and sci_metric.gold_letter("B") == "B"
    assert sci_metric.score(demo, demo) == 1.0


# ---- both: usable as `--metric module:function` ------------------------------------------------


@pytest.mark.parametrize(
    "name, prediction, reference",
    [
        (
            "recipes.tooluse.metric:score",
            "Action: randomFact\nAction Input: {}",
            "Action: randomFact\nAction Input: {}",
        ),
        ("recipes.science.metric:score", "<answer>C</answer>", "<answer>C</answer>"),
    ],
)
def test_metrics_resolve_from_the_repo_root(monkeypatch, name, prediction, reference):
    monkeypatch.syspath_prepend(str(REPO))  # what PYTHONPATH=. does from the repo root
    for module in [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")]:
        monkeypatch.delitem(sys.modules, module)
    metric = resolve_metric(name)
    assert metric(prediction, reference) == 1.0
    assert metric("", reference) == 0.0


def test_recipe_test_lines_score_themselves(tmp_path, capsys):
    """A perfect answer (the gold written back) scores 1, except the official nested-input quirk."""
    assert (
        tool_prep.main(["--source", str(FIXTURES / "tooluse"), "--out", str(tmp_path / "t")]) == 0
    )
    assert sci_prep.main(["--source", str(FIXTURES / "science"), "--out", str(tmp_path / "s")]) == 0
    tool = [
        tool_metric.score(ex.demonstration, ex.demonstration)
        for ex in load_examples(tmp_path / "t/test.jsonl")
    ]
    assert tool == [1.0, 1.0, 0.0]  # the third gold has a nested argument
    assert all(
        sci_metric.score(ex.demonstration, ex.demonstration) == 1.0
        for ex in load_examples(tmp_path / "s/test.jsonl")
    )


def test_recipes_say_which_objective_they_train():
    """The paper's recipes train the paper's objective (PAPER_SDFT), not mlx-sdft's defaults; the
    retention-small methods write out every option that makes them what their names say: `sdft` is
    today's defaults, `sdft_before` the paper's."""
    from mlx_sdft.config import PAPER_SDFT, load_config

    base = {"model": "m", "data": "demos.jsonl"}
    keys = tuple(PAPER_SDFT)
    resolved = lambda cfg: {k: getattr(cfg, k) for k in keys}  # noqa: E731
    paper = resolved(load_config(None, {**base, **PAPER_SDFT}))
    for recipe in ("tooluse", "science"):
        assert resolved(load_config(str(REPO / f"recipes/{recipe}/config.yaml"), base)) == paper, (
            recipe
        )
    sys.path.insert(0, str(REPO / "recipes/retention-small"))  # run.py imports its metric.py
    methods = _load("retention_small_run", REPO / "recipes/retention-small/run.py").METHODS
    assert resolved(load_config(None, {**base, **methods["sdft"]})) == resolved(
        load_config(None, base)
    )
    assert resolved(load_config(None, {**base, **methods["sdft_before"]})) == paper
    for name, options in methods.items():  # a method does not depend on the defaults of the four
        assert name == "sft" or set(keys) <= options.keys(), name
