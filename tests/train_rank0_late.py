"""pipeline/train.py whose rank 0 starts LATE seconds after the other ranks (for tests): a line that rank 0 says
comes after the others have stopped.

LATE=3 deepspeed --num_gpus 2 tests/train_rank0_late.py [pipeline/train.py flags]
"""

import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline import ending, train  # noqa: E402

if __name__ == "__main__":
    if os.environ["RANK"] == "0":
        time.sleep(float(os.environ["LATE"]))
    ending.end_process(train.main(sys.argv[1:]))
