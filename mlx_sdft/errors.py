"""The errors users see, each as one line; `cli.EXIT_STATUS` gives each its exit status (2, 1, 3, 130)."""


class InputError(Exception):
    """Bad user input (data, config, flags). The message is shown as one line, without a traceback."""


class TrainingError(Exception):
    """Training cannot go on (e.g. repeated non-finite losses). Shown as one line; exit status 1."""


class Rejected(TrainingError):
    """`learn`: the gate rejected the candidate version (current unchanged). One line; exit status 3."""


class Interrupted(Exception):
    """Ctrl-C: the run saved its state after `step` and stopped; `--resume` continues it."""

    def __init__(self, step: int, saved: bool = True):
        super().__init__(
            f"interrupted after step {step}; the run is saved"
            if saved
            else f"interrupted after step {step}, before any token reached the loss: nothing saved"
        )
        self.step, self.saved = step, saved


def one_line(message: object) -> str:
    """A message of several lines (a library's exception text) as one line: the lines joined with
    spaces, so it is never cut mid-sentence."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())
