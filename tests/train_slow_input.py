"""pipeline/train.py with an input pipeline slowed down by SLOW seconds per batch (for tests).

SLOW=0.2 python tests/train_slow_input.py [pipeline/train.py flags]
"""

import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline import train  # noqa: E402


def main() -> int:
    """start -> (the same run, each batch SLOW seconds late) -> train_to_end, as pipeline/train.py's main does."""
    delay = float(os.environ["SLOW"])
    run = train.start(sys.argv[1:])
    if isinstance(run, int):
        return run
    read = run.data.train_epoch

    def slow(epoch):
        for batch in read(epoch):
            time.sleep(delay)
            yield batch

    run.data.train_epoch = slow
    return train.train_to_end(run)


if __name__ == "__main__":
    sys.exit(main())
