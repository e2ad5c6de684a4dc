"""pipeline/train.py with an input pipeline slowed down by SLOW seconds per batch (for tests).

SLOW=0.2 python tests/train_slow_input.py [pipeline/train.py flags]
"""

import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline import ending, train  # noqa: E402


def main() -> int:
    """pipeline/train.py's main, each training batch SLOW seconds late."""
    delay = float(os.environ["SLOW"])

    def slowed(run) -> None:
        read = run.data.train_epoch

        def slow(epoch):
            for batch in read(epoch):
                time.sleep(delay)
                yield batch

        run.data.train_epoch = slow

    return train.main(sys.argv[1:], prepare=slowed)


if __name__ == "__main__":
    ending.end_process(main())
