"""Which configuration trained faster end to end in a session's throughput results (bench/gpu/session.sh):

    python bench/gpu/faster.py RESULTS_DIR CONFIG.json [CONFIG.json ...]

Prints the configuration whose <date>-<device>-<name>.json shows the most end-to-end images/s; the first one
given when none has figures yet."""

import json
import sys
from pathlib import Path


def faster(results: Path, configs: list[str]) -> str:
    """The configuration with the most end-to-end images/s in `results`, else the first."""
    speeds = {}
    for config in configs:
        for path in results.glob(f"*-{Path(config).stem}.json"):
            speed = json.loads(path.read_text()).get("end_to_end_img_s")
            if speed:
                speeds[config] = max(speed, speeds.get(config, 0))
    return max(speeds, key=speeds.get) if speeds else configs[0]


if __name__ == "__main__":
    print(faster(Path(sys.argv[1]), sys.argv[2:]))
