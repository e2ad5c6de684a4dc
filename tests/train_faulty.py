"""pipeline/train.py with a numeric fault injected into its training images (for tests).

FAULT=nan@5 python tests/train_faulty.py [pipeline/train.py flags]    the images of optimizer step 5 become NaN
FAULT=inf@3+ ...                                                      every step from step 3 on gets infinities
FAULT=1e30@2 ...                                                      images scaled by 1e30 (finite) at step 2
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline import ending, train  # noqa: E402


def main() -> int:
    """pipeline/train.py's main, its training images made faulty."""
    factor, at = os.environ["FAULT"].split("@")
    first, onwards = int(at.rstrip("+")), at.endswith("+")

    def faulty(run) -> None:
        read = run.data.train_epoch

        def epoch_batches(epoch):
            for i, batch in enumerate(read(epoch)):
                step = epoch * run.schedule.steps_per_epoch + i // run.accum + 1  # the optimizer step it belongs to
                if step == first or (onwards and step >= first):
                    batch = batch._replace(images=batch.images * float(factor))
                yield batch

        run.data.train_epoch = epoch_batches

    return train.main(sys.argv[1:], prepare=faulty)


if __name__ == "__main__":
    ending.end_process(main())
