"""pipeline/train.py with DeepSpeed's CPU accelerator allowed to build its fp16 wrapper, for measuring the wrapper's
numerics on a CPU (bench/numerics.py --fp16-on-cpu, and the tests). DeepSpeed refuses fp16 on its CPU accelerator,
though the wrapper's arithmetic does not depend on the device; torch runs fp16 kernels on a CPU, slowly. Not for
training: use a GPU.

    python bench/fp16_cpu_train.py --deepspeed_config ds_configs/bs256.json --allow-cpu [pipeline/train.py flags]
"""

import sys
from pathlib import Path


def allow_fp16_on_the_cpu_accelerator() -> None:
    """Make DeepSpeed's accelerator report fp16 support (on a CPU it says no)."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    allow_fp16_on_the_cpu_accelerator()
    from pipeline import ending, train

    ending.end_process(train.main())
