"""pipeline/train.py with one more checkpoint component registered from outside (for tests): neither train.py nor
checkpoint.py knows it. It saves its session's name and the step it was saved at; when a resume hands its state
back, it writes that state to $EXTRA_STATE_OUT.

SESSION=first EXTRA_STATE_OUT=extra.json python tests/train_extra_state.py [pipeline/train.py flags]
"""

import json
import os
import sys
from pathlib import Path

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline import ending, train  # noqa: E402


class Extra:
    """A component: its session's name, and the optimizer step it is saved at."""

    def __init__(self, run):
        self.run, self.session = run, os.environ["SESSION"]

    def state_dict(self) -> dict:
        return {"session": self.session, "step": self.run.engine.global_steps}

    def load_state_dict(self, state: dict) -> None:
        Path(os.environ["EXTRA_STATE_OUT"]).write_text(json.dumps(state))


def register(run) -> None:
    """Register Extra as one of the run's components."""
    run.components["extra"] = Extra(run)


if __name__ == "__main__":
    ending.end_process(train.main(sys.argv[1:], prepare=register))
