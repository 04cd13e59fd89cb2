"""`serve --learn-every N`: `mlx-sdft learn` in the background once N new lessons have arrived.

The learn runs as a child process (its own model, the same lock and gate as the command), so the
server keeps answering from the current version meanwhile and switches when the gate accepts. A
rejected update leaves its lessons `new`; the next attempt waits for N more lessons, so a gate
that keeps saying no does not make the server retrain after every lesson.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

LOG = "learn.log"  # in --home, readable by you only: what the background learns printed (ids and numbers)


class Learner:
    def __init__(self, cfg):
        self.cfg, self.proc, self.attempted = cfg, None, 0
        self._lock = threading.Lock()

    def poke(self, new_lessons: int) -> bool:
        """Called after a lesson is stored, with the number of lessons in state `new`; starts a learn
        when there are N more than at the last attempt and none is running. True when it started one."""
        if not self.cfg.learn_every:
            return False
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return False
            if self.proc is not None:
                self.attempted = (
                    0 if self.proc.returncode == 0 else self.attempted
                )  # learned: count afresh
            if new_lessons - self.attempted < self.cfg.learn_every:
                return False
            home = Path(self.cfg.home).expanduser()
            # --no-log-text: no prompt, lesson or completion text goes into the log, and no completions.jsonl
            # into the candidate, so what forget and lessons delete erase from the store is nowhere else in the home
            args = [
                sys.executable,
                "-m",
                "mlx_sdft",
                "learn",
                "--home",
                str(home),
                "--model",
                self.cfg.model,
                "--no-log-text",
                "--log-completions",
                "0",
            ]
            if self.cfg.learn_config:
                args += ["-c", self.cfg.learn_config]
            fd = os.open(home / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.fchmod(fd, 0o600)  # one an earlier release left readable by others, too
            with open(fd, "a") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            self.attempted = new_lessons
            print(
                f"mlx-sdft serve: {new_lessons} new lessons: learning in the background (pid {self.proc.pid}, "
                f"log {home / LOG})",
                file=sys.stderr,
                flush=True,
            )
            return True
