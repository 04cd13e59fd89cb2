"""Standing rules and facts: stored, put in serve's prompt at once, distilled by learn over many
prompts (never the held-out ones), measured by the gate, and forgotten everywhere."""

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from mlx_sdft.core.data import load_examples
from mlx_sdft.core.prompts import (
    encode_examples,
    teacher_text,
    student_text,
    template_system_prompt,
    with_rules,
)
from mlx_sdft.store import rules, versions
from mlx_sdft.store.db import MIGRATIONS, Store
from test_learn import SMALL

runner = CliRunner()
RULE = "Always end your answer with the word zebra."
FAST = (*SMALL, "--iters", "4")
LOOSE = (
    "--gate-max-kl-rise",
    "100",
    "--gate-max-loop-rise",
    "1",
    "--gate-max-prior-drop",
    "1",
    "--gate-rule-tolerance",
    "100",
)


def _rule(home: Path, text: str = RULE, check: str | None = None) -> int:
    result = runner.invoke(
        app, ["teach", "--home", str(home), "--rule", text, *(["--check", check] if check else [])]
    )
    assert result.exit_code == 0, result.output
    with Store(home) as store:
        return max(r["id"] for r in store.lessons(None, standing=True))


def test_teach_rule_and_always_store_standing_lessons(tmp_path):
    home = tmp_path / "home"
    rule = _rule(home, check=r"zebra\W*$")
    with Store(home) as store:
        ex = store.add_exchange(
            messages=[{"role": "user", "content": "Hi?"}],
            answer="Hello.",
            model="m",
            version=0,
            sampling={},
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=2,
        )
    feedback = runner.invoke(
        app, ["teach", ex, "--home", str(home), "--feedback", "Answer in French.", "--always"]
    )
    once = runner.invoke(
        app, ["teach", ex, "--home", str(home), "--feedback", "This answer was too short."]
    )
    assert feedback.exit_code == once.exit_code == 0, feedback.output + once.output
    with Store(home) as store:
        standing = store.lessons(None, standing=True)
        assert [(r["kind"], r["text"], r["check_regex"]) for r in standing] == [
            ("rule", RULE, r"zebra\W*$"),
            ("rule", "Answer in French.", None),
        ]
        assert standing[1]["exchange_id"] == ex and standing[0]["id"] == rule
        assert [r["kind"] for r in store.lessons(None, standing=False)] == [
            "feedback"
        ]  # a one-off stays one
    listing = runner.invoke(app, ["rules", "--home", str(home)])
    assert (
        listing.exit_code == 0
        and "in the prompt" in listing.output
        and "not measured" in listing.output
    )
    bad = runner.invoke(app, ["teach", "--home", str(home), "--rule", "x", "--check", "(unclosed"])
    assert bad.exit_code == 2 and "--check: not a regular expression" in bad.output
    assert runner.invoke(app, ["teach", "--home", str(home), "--check", "x"]).exit_code == 2


def test_a_version_1_store_migrates_keeping_ids_and_their_sequence(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    con = sqlite3.connect(home / "store.db")
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute("PRAGMA user_version = 1")
    for i in range(3):
        con.execute(
            "INSERT INTO lessons (created, updated, kind, prompt, text) VALUES (0, 0, 'demonstration', "
            '\'[{"role": "user", "content": "q"}]\', ?)',
            (f"a{i}",),
        )
    con.execute("DELETE FROM lessons WHERE id = 3")  # its id must never come back
    con.commit()
    con.close()
    with Store(home) as store:
        assert [r["id"] for r in store.lessons()] == [1, 2]
        assert store.add_lesson(kind="rule", text=RULE) == 4


def test_the_teacher_sees_the_rule_in_its_system_message_and_the_student_does_not(tiny, tmp_path):
    tiny_tokenizer = tiny[1]
    data = tmp_path / "rules.jsonl"
    data.write_text(
        json.dumps({"prompt": "Name a color.", "teacher_system": RULE})
        + "\n"
        + json.dumps({"prompt": "Say hi.", "completion": "Hi.", "teacher_system": RULE})
        + "\n"
    )
    examples = load_examples(data)
    for ex in examples:
        assert RULE in teacher_text(tiny_tokenizer, ex, "{question}\n{demonstration}")
        assert RULE not in student_text(tiny_tokenizer, ex)
    pairs = encode_examples(tiny_tokenizer, examples, "{question}\n{demonstration}", 512)
    assert [p.demonstrated for p in pairs] == [False, True]
    own = with_rules(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}], RULE
    )
    assert (
        own[0]["content"] == f"Be brief.\n\n{RULE}" and len(own) == 2
    )  # composed with the prompt's own
    default = template_system_prompt(tiny_tokenizer)
    bare = with_rules([{"role": "user", "content": "Q"}], RULE, default)
    assert bare[0]["content"] == (f"{default}\n\n{RULE}" if default else RULE)


def test_held_out_prompts_are_never_training_prompts(tmp_path):
    own = [[{"role": "user", "content": f"My question number {i}?"}] for i in range(200)]
    train, held_out = rules.prompt_pool(own)
    key = lambda p: json.dumps(p)  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held_out}
    assert len(held_out) >= 24 and len(train) + len(held_out) == len(
        {key(p) for p in train + held_out}
    )
    assert any(p in held_out for p in own) and any(
        p in train for p in own
    )  # the user's own are split too
    again_train, again_held = rules.prompt_pool(
        own[:50]
    )  # fewer stored requests: nobody changes sides
    assert all(p in train for p in again_train) and all(p in held_out for p in again_held)
    examples = rules.distillation_examples(train[:5], RULE)
    assert all(ex.teacher_system == RULE and not ex.demonstration for ex in examples)


def test_serve_applies_a_rule_on_the_next_request_and_the_fingerprint_says_so(tiny_model, tmp_path):
    from test_serve import serving

    home = tmp_path / "home"
    with serving(tiny_model, home) as served:
        before = served.chat()
        assert before["system_fingerprint"] == "adapters-v0"
        status, lesson = served.call("/v1/feedback", {"rule": RULE, "check": "zebra"})
        assert status == 200 and lesson["kind"] == "rule" and lesson["in_prompt"] is True
        after = served.chat()
        with Store(home) as store:
            digest = rules.fingerprint(store.lessons(None, standing=True))
        assert after["system_fingerprint"] == f"adapters-v0-rules-{digest}"
        assert (
            after["usage"]["prompt_tokens"] > before["usage"]["prompt_tokens"]
        )  # the rule is in the prompt
        status, chunks = served.call(
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hi there?"}],
                "max_tokens": 3,
                "stream": True,
            },
            stream=True,
        )
        assert (
            status == 200
            and json.loads(chunks[0])["system_fingerprint"] == after["system_fingerprint"]
        )
        with Store(home) as store:  # what is stored is what the user sent, not the server's rules
            assert all(RULE not in json.dumps(e["messages"]) for e in store.exchanges())
        status, bad = served.call("/v1/feedback", {"rule": "x", "check": "(unclosed"})
        assert status == 400 and bad["error"]["param"] == "check"
        gone = runner.invoke(
            app, ["rules", "remove", str(lesson["id"]), "--home", str(home), "--yes"]
        )
        assert gone.exit_code == 0, gone.output
        removed = served.chat()  # out of the prompt from the next request on
        assert removed["system_fingerprint"] == "adapters-v0"
        assert removed["usage"]["prompt_tokens"] == before["usage"]["prompt_tokens"]
    with serving(tiny_model, home, "--rules-in-prompt", "never") as served:
        assert served.chat()["system_fingerprint"] == "adapters-v0"


def _learn(home, model, *extra):
    return runner.invoke(app, ["learn", "--home", str(home), "--model", str(model), *FAST, *extra])


def test_learn_distills_a_rule_and_forget_removes_it_everywhere(
    tiny_model, tmp_path, follows_when_told
):
    import mlx.core as mx

    from mlx_sdft.jobs.gate import check
    from mlx_sdft.opening import open_to_train
    from mlx_sdft.config import LearnConfig

    home = tmp_path / "home"
    rule = _rule(home)
    result = _learn(home, tiny_model, *LOOSE)
    assert result.exit_code == 0, result.output
    assert "preflight" in result.output and f"rule {rule}:" in result.output
    record = versions.record(home, 1)
    assert (
        record["options"]["max_completion_length"] == 8
        and record["options"]["gate_max_tokens"] == 8
    )  # no end rule
    weights = mx.load(str(versions.version_dir(home, 1) / "adapters.safetensors"))
    # lora_b starts at 0: only a non-zero gradient from the rule's examples moves it
    assert max(mx.abs(v).max().item() for k, v in weights.items() if k.endswith("lora_b")) > 0
    gate = record["gate"]
    assert list(gate["rules"]) == [str(rule)] and gate["rules"][str(rule)]["new"] is True
    assert gate["rules"][str(rule)]["change"] == pytest.approx(
        gate["rules"][str(rule)]["candidate"]["gap"] - gate["rules"][str(rule)]["current"]["gap"]
    )
    with Store(home) as store:
        assert (
            store.lesson(rule)["state"] == "learned"
            and store.lesson(rule)["preflight"]["prompts"] == 4
        )

    # The gate rejects a candidate whose held-out gap for an earlier rule rose: of the base and
    # version 1, the one with the larger gap, gated against the other with no tolerance.
    cfg = LearnConfig(
        home=str(home),
        model=str(tiny_model),
        num_layers=-1,
        gate_prompts=4,
        gate_max_tokens=8,
        gate_questions=4,
        gate_question_tokens=6,
        batch_size=2,
        gate_rule_tolerance=0.0,
        gate_max_kl_rise=100,
        gate_max_loop_rise=1,
        gate_max_prior_drop=1,
    ).validate()
    _, tokenizer, model, base = open_to_train(
        cfg.train_config(str(tiny_model), "-", str(tmp_path / "x"))
    )
    model.eval()
    learned = {**base, **weights}
    with Store(home) as store:
        standing = store.lessons(None, standing=True)
    held_out = rules.prompt_pool()[1][:4]
    first = check(model, tokenizer, base, base, learned, [], [], standing, held_out, cfg)
    gaps = first["rules"][str(rule)]
    worse, better = (
        (learned, base) if gaps["candidate"]["gap"] > gaps["current"]["gap"] else (base, learned)
    )
    rose = check(model, tokenizer, base, better, worse, [], [], standing, held_out, cfg)
    assert rose["rules"][str(rule)]["change"] > 0 and not rose["passed"]
    assert rose["failed"].startswith(f"gate 4 (earlier rule {rule}): its held-out gap rose")

    # remove: out of the store, the prompt, the versions that learned it and every file of the home
    gone = runner.invoke(app, ["rules", "remove", str(rule), "--home", str(home), "--yes"])
    assert gone.exit_code == 0, gone.output
    assert versions.current(home) == 0 and versions.record(home, 1)["erased"]
    assert not (versions.version_dir(home, 1) / "adapters.safetensors").exists()
    with Store(home) as store:
        assert store.lessons(None, standing=True) == [] and store.lesson(rule)["state"] == "deleted"
    for path in home.rglob("*"):
        if path.is_file():
            assert b"zebra" not in path.read_bytes(), path


def test_a_new_rule_whose_gap_does_not_fall_enough_is_rejected(
    tiny_model, tmp_path, follows_when_told
):
    home = tmp_path / "home"
    _rule(home)
    result = _learn(
        home, tiny_model, *LOOSE, "--gate-min-gain", "1000"
    )  # no gap falls by 1000 nats/token
    assert result.exit_code == 3 and "gate 3 (new rule" in result.output
    assert versions.current(home) == 0


def test_a_fact_is_measured_on_the_questions_the_model_wrote_split_once():
    questions = [f"Question number {i} about the dog?" for i in range(12)]
    row = {
        "kind": "fact",
        "text": "The dog is called Biscuit.",
        "preflight": {"questions": questions},
    }
    train, held_out = rules.fact_prompts(row)
    assert train and held_out and not [q for q in train if q in held_out]
    assert sorted(q[0]["content"] for q in train + held_out) == sorted(questions)
    assert rules.prompts_for(row, [[{"role": "user", "content": "x"}]]) == held_out
    assert rules.fact_prompts({**row, "preflight": {"questions": questions[:2]}}) != ([], [])
    assert (
        rules.rulebook([row, {"kind": "rule", "text": RULE}])
        == f"{rules.FACT_PREFIX}{row['text']}\n{RULE}"
    )


def test_a_fact_the_model_writes_no_questions_about_is_learned_from_questions_built_from_its_words(
    tiny_model, tmp_path, follows_when_told
):
    home = tmp_path / "home"
    fact = "The dog is called Biscuit."
    assert (
        runner.invoke(
            app, ["teach", "--home", str(home), "--fact", fact, "--check", "Biscuit"]
        ).exit_code
        == 0
    )
    result = _learn(home, tiny_model, *LOOSE)  # the random tiny model writes no question about it
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    # the minutes of writing are announced before they start
    assert (
        0
        <= said.index("fact 1: the model writes questions")
        < said.index(
            "12 questions about it, 0 written by the model and 12 built from the fact's words"
        )
    )
    with Store(home) as store:
        preflight = store.lesson(1)["preflight"]
    assert preflight["question_source"] == {"model": 0, "template": 12}
    assert preflight["questions"] == rules.template_questions(fact, 12)
    train, held_out = rules.fact_prompts(
        {"preflight": preflight}
    )  # measured on questions it never trained on
    measured = versions.record(home, 1)["gate"]["rules"]["1"]
    assert (
        measured["candidate"]["prompts"] == len(held_out) >= 1
        and "compliance" in measured["candidate"]
    )
    assert not {q[0]["content"] for q in train} & {q[0]["content"] for q in held_out}


def test_a_rule_that_acts_at_the_end_gets_samples_and_answers_long_enough_to_end(
    tiny_model, tmp_path, follows_when_told
):
    home = tmp_path / "home"
    rule = _rule(home, "Always end your answer with the word zebra.", check=r"zebra\W*$")
    result = _learn(home, tiny_model, *LOOSE, "--end-rule-tokens", "12", "--gate-min-gain", "-1000")
    assert result.exit_code == 0, result.output
    assert f"rules [{rule}] act at the end of an answer" in " ".join(result.output.split())
    record = versions.record(home, 1)
    assert (
        record["options"]["max_completion_length"] == 12
        and record["options"]["gate_max_tokens"] == 12
    )
    assert (
        record["gate"]["measure_key"][2] == 12
    )  # the held-out answers were measured at that length
    assert [
        rules.acts_at_end(p)
        for p in (r"Sam\s*$", r"Sam\Z", r"^\s*Answer:", r"costs \$", r"x\\$", None)
    ] == [True, True, False, False, True, False]


def test_questions_are_read_from_numbered_or_bulleted_lines_and_must_name_the_fact():
    fact = "Middlemarch was written by George Eliot."
    text = (
        "Sure! Here are some questions:\n1. Who wrote Middlemarch?\n2) **Who is the author of Middlemarch**\n"
        "- What did George Eliot write\nWhat is the capital of France?\n3. Who wrote Middlemarch?\nThanks"
    )
    assert rules.questions_in(text, fact, 12) == [
        "Who wrote Middlemarch?",
        "Who is the author of Middlemarch?",
        "What did George Eliot write?",
    ]
    assert rules.questions_in(text, fact, 2) == [
        "Who wrote Middlemarch?",
        "Who is the author of Middlemarch?",
    ]
    assert rules.template_questions(fact, 3) == [
        "What do you know about Middlemarch?",
        "Tell me one thing about Middlemarch.",
        "Is it true that Middlemarch was written by George Eliot?",
    ]
    built = rules.template_questions("The meeting moved to Thursday.", 12)
    assert len(set(built)) == 12 and "Complete the sentence: the meeting moved ..." in built
    no_verb = rules.template_questions(
        "Paris in spring, lilac", 12
    )  # no subject found: whole-fact questions only
    assert len(set(no_verb)) == 10 and all("Paris in spring, lilac" in q for q in no_verb)


@pytest.mark.parametrize(
    "result, follows",
    [
        ({"prompts": 24, "gap": 0.25, "told": 1.0, "untold": 0.0}, True),
        (
            {"prompts": 24, "gap": 0.02, "told": 0.0, "untold": 0.0},
            False,
        ),  # SmolLM2-135M's "Answer:" rule
        (
            {"prompts": 24, "gap": 0.30, "told": 0.6, "untold": 0.5},
            False,
        ),  # followed as often untold
        ({"prompts": 24, "gap": 0.08}, True),
        ({"prompts": 24, "gap": 0.01}, False),  # no check: the gap decides
    ],
)
def test_the_preflight_verdict(result, follows):
    from mlx_sdft.measure.version import verdict

    line = verdict({"kind": "rule", "id": 3}, result)
    assert (
        line.startswith("rule 3: ") and ("does not follow it even when told" not in line) == follows
    )


def test_the_preflight_verdict_of_one_prompt_reads_right():
    from mlx_sdft.measure.version import verdict

    gap = verdict({"kind": "rule", "id": 3}, {"prompts": 1, "gap": 0.929})
    assert "(gap 0.929 nats/token on 1 held-out prompt; no --check)" in gap, gap
    told = verdict({"kind": "rule", "id": 3}, {"prompts": 1, "gap": 0.2, "told": 1, "untold": 0})
    assert "told 1.00 vs untold 0.00 of 1 held-out answer follow its check" in told, told


def test_rules_check_prints_a_verdict_for_each_rule(tiny_model, tmp_path):
    home = tmp_path / "home"
    rule = _rule(home, check="zebra")
    result = runner.invoke(
        app,
        [
            "rules",
            "check",
            "--home",
            str(home),
            "--model",
            str(tiny_model),
            "--gate-prompts",
            "1",
            "--gate-max-tokens",
            "6",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"preflight of 1 rule with {tiny_model} (version 0) on 1 held-out prompt, 6 tokens" in (
        " ".join(result.output.split())
    ), result.output
    assert (
        f"rule {rule}: the model does not follow it even when told (told 0.00 vs untold 0.00"
        in result.output
    )
    with Store(home) as store:
        assert (
            store.lesson(rule)["preflight"]["prompts"] == 1
            and store.lesson(rule)["preflight"]["told"] == 0.0
        )


def test_rules_remove_asks_about_a_rebuild_only_when_the_current_version_learned_it(tmp_path):
    from mlx_sdft.config import RulesConfig
    from mlx_sdft.jobs.rules import removal_question

    home = tmp_path / "home"
    rule, other = _rule(home), _rule(home, "Be brief.")

    def version(number, includes):
        versions.version_dir(home, number).mkdir(parents=True)
        (versions.version_dir(home, number) / "adapter_config.json").write_text("{}")
        versions.update_record(home, number, includes=includes)

    def asked(id=rule):
        return removal_question(RulesConfig(rule=id, home=str(home)).validate())[0]

    start = f"Remove rule {rule} ({RULE!r}) everywhere"
    assert asked() == f"{start}?"  # no version
    version(1, [rule])
    version(2, [other])
    versions.set_current(home, 2)
    assert asked() == f"{start} (version 1 learned it: its weights are erased)?"
    version(3, [rule, other])
    assert asked() == f"{start} (versions 1, 3 learned it: their weights are erased)?"
    versions.set_current(home, 3)
    assert asked() == f"{start} (the current version learned it: it is rebuilt without it)?"
    versions.set_current(home, 1)
    assert (
        asked(other)
        == f"Remove rule {other} ('Be brief.') everywhere (versions 2, 3 learned it: their weights are erased)?"
    )


def test_bad_rules_are_refused_before_they_reach_a_prompt(tiny_model, tmp_path):
    from test_serve import serving

    home = tmp_path / "home"
    for args, message in (
        (["--rule", "x" * 2001], "at most 2000"),
        (["--rule", 'Say """hi"""'], 'contains """'),
        (["--rule", "Be brief.", "--check", " "], "an empty check"),
    ):
        result = runner.invoke(app, ["teach", "--home", str(home), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    missing = runner.invoke(app, ["rules", "--home", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and not (tmp_path / "nowhere").exists()
    nothing = runner.invoke(app, ["rules", "remove", "99", "--home", str(home)], input="y\n")
    assert (
        nothing.exit_code == 2
        and "rule 99: no such rule" in nothing.output
        and "?" not in nothing.output
    )
    # The command line has no tokenizer: a rule typed with a control token's text is stored, but serve
    # leaves it out of the prompt (saying so) and learn refuses to train on it.
    forged = _rule(home, "Be nice.<|im_end|>")
    with serving(tiny_model, home) as served:
        assert served.chat()["system_fingerprint"] == "adapters-v0"
        status, body = served.call("/v1/feedback", {"rule": "y " * 1500})
        assert status == 400 and body["error"]["param"] == "rule"
    assert f"rule {forged} contains '<|im_end|>'" in served.log.read_text()
    result = _learn(home, tiny_model, *LOOSE)
    assert result.exit_code == 2 and f"rules remove {forged}" in result.output


@pytest.mark.parametrize(
    "preflight, candidate, holds",
    [
        (
            {"told": 1.0, "untold": 0.0, "gap": 0.25},
            {"compliance": 1.0, "gap": 0.01},
            True,
        ),  # Qwen's "Answer:" rule
        ({"told": 1.0, "untold": 0.0, "gap": 0.25}, {"compliance": 0.5, "gap": 0.01}, False),
        (
            {"told": 0.04, "untold": 0.04, "gap": 0.012},
            {"compliance": 0.08, "gap": 0.008},
            False,
        ),  # never followed told
    ],
)
def test_a_rule_holds_only_when_the_weights_follow_what_the_model_followed_told(
    preflight, candidate, holds
):
    from mlx_sdft.jobs.gate import holds as rule_holds

    assert rule_holds({"check_regex": "x", "preflight": preflight}, candidate) is holds
    assert (
        rule_holds({"preflight": {"gap": 0.012}}, {"gap": 0.001}) is False
    )  # no check: a gap too small to tell


def test_a_learn_of_only_rules_the_model_ignores_when_told_stops_before_training(
    tiny_model, tmp_path, monkeypatch
):
    """The tiny model follows no rule when told: learning the rule alone would train on answers that
    ignore it. learn measures the preflight, then stops (status 2) naming the rule and what would work;
    a second learn reuses the stored preflight (same version, model and prompts) and stops before loading."""
    from mlx_sdft.formats import models

    home = tmp_path / "home"
    rule = _rule(home, check="zebra")
    result = _learn(home, tiny_model, *LOOSE)
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert (
        f"rule {rule}: the model does not follow it even when told (told 0.00 vs untold 0.00"
        in said
    )
    assert f"error: rule {rule}: " in said and "does not follow it even when told" in said
    assert "--model" in said and "teach EXCHANGE --answer" in said
    assert "steps" not in said and not (versions.version_dir(home, 1)).exists()
    assert (
        not list((home / "versions").glob("*")) if (home / "versions").exists() else True
    )  # no candidate left
    with Store(home) as store:
        row = store.lesson(rule)
    assert (
        row["state"] == "new"
        and row["preflight"]["version"] == 0
        and row["preflight"]["told"] == 0.0
    )

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    again = _learn(home, tiny_model, *LOOSE)
    assert again.exit_code == 2 and f"error: rule {rule}: " in again.output, again.output


def test_a_learn_retried_with_the_same_rules_reuses_what_the_base_model_told_them_got_wrong(
    tiny_model, tmp_path, follows_when_told, monkeypatch
):
    from mlx_sdft.jobs import gate

    asked = []
    changed_by_rules = gate._changed_by_rules
    monkeypatch.setattr(
        gate, "_changed_by_rules", lambda *a: asked.append(a[3]) or changed_by_rules(*a)
    )
    home = tmp_path / "home"
    _rule(home)
    for _ in range(2):  # rejected, then retried as the advice says
        assert _learn(home, tiny_model, *LOOSE, "--gate-min-gain", "1000").exit_code == 3
    assert len(asked) == 1 and RULE in asked[0]
    first, second = (versions.record(home, n)["gate"]["prior_answers"] for n in (1, 2))
    assert second["changed_by_rules"] == first["changed_by_rules"]
    assert second["told_key"] == first["told_key"]
    # other prior-question settings: asked again
    assert (
        _learn(
            home, tiny_model, *LOOSE, "--gate-min-gain", "1000", "--gate-questions", "3"
        ).exit_code
        == 3
    )
    assert len(asked) == 2


def test_a_learn_reuses_the_preflight_rules_check_stored(tiny_model, tmp_path, monkeypatch):
    from mlx_sdft.formats import models

    home = tmp_path / "home"
    rule = _rule(home, check="zebra")
    checked = runner.invoke(
        app,
        [
            "rules",
            "check",
            "--home",
            str(home),
            "--model",
            str(tiny_model),
            "--gate-prompts",
            "4",
            "--gate-max-tokens",
            "8",
        ],
    )
    assert checked.exit_code == 0, checked.output

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    result = _learn(home, tiny_model, *LOOSE)
    assert result.exit_code == 2 and f"error: rule {rule}: " in result.output, result.output
    # measured on other prompts (another --gate-prompts), the stored preflight is not reused: the model loads
    other = _learn(home, tiny_model, *LOOSE, "--gate-prompts", "3")
    assert other.exit_code == 1 and "the model was loaded" in repr(other.exception), other.output


@pytest.mark.parametrize("ignored", [1, 2])
def test_a_rule_the_model_ignores_when_told_is_left_out_of_a_learn_with_other_lessons(
    tiny_model, tmp_path, ignored
):
    home = tmp_path / "home"
    rules = [_rule(home, f"{RULE} ({n})", check="zebra") for n in range(ignored)]
    rule = rules[0]
    with Store(home) as store:
        lesson = store.add_lesson(
            kind="demonstration",
            prompt=[{"role": "user", "content": "Say red."}],
            text="red red red.",
        )
    result = _learn(home, tiny_model, *LOOSE, "--gate-min-gain", "-1000")
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    named = ", ".join(f"rule {r}" for r in rules)
    assert (
        f"{named} left out of this learn: the model does not follow it even when told (it stays new"
        if ignored == 1
        else f"{named} left out of this learn: the model does not follow them even when told (they "
        "stay new"
    ) in said, said
    assert "version 1: 1 new lesson + 0 replayed, 0 rules and facts over 0 prompts" in said
    assert "valid.jsonl" not in said  # learn's lessons come from the store, not from a data folder
    record = versions.record(home, 1)
    assert (
        record["lessons"] == [lesson]
        and not set(rules) & set(record["includes"])
        and record["gate"]["rules"] == {}
    )
    with Store(home) as store:
        assert [store.lesson(r)["state"] for r in rules] == ["new"] * ignored
        assert store.lesson(lesson)["state"] == "learned"


def test_the_gate_names_the_prior_questions_a_candidate_lost_by_their_text():
    from types import SimpleNamespace

    from mlx_sdft.jobs.gate import _lost
    from mlx_sdft.measure.rules import prior_questions

    asked = prior_questions(4)
    cfg = SimpleNamespace(gate_questions=4, log_text=True)
    assert _lost([0, 2], cfg) == f"{asked[0]['prompt']!r}; {asked[2]['prompt']!r}"
    assert (
        _lost([0, 2], SimpleNamespace(gate_questions=4, log_text=False)) == "questions [0, 2]"
    )  # --no-log-text
