"""The on-disk format has one home, pipeline.format: the training code reads shards without data_prep, and
importing it changes no other library's globals."""

import sys

import pytest

from tests import procs
from tests.runs import ROOT

PROBE = """
import sys
from PIL import Image
before = Image.MAX_IMAGE_PIXELS
import pipeline.train, pipeline.evaluate, pipeline.export, pipeline.data, pipeline.data.preview, pipeline.scaling_study
loaded = sorted(m for m in sys.modules if m == "data_prep" or m.startswith("data_prep."))
print(loaded, Image.MAX_IMAGE_PIXELS == before, "timm" in sys.modules)
"""


@pytest.mark.slow
def test_the_training_code_imports_nothing_from_data_prep_and_leaves_pillow_alone():
    """Nor timm: its import costs every rank about a second, and only --blurpool, --ema-decay and LARS use it."""
    proc = procs.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "[] True False"


def test_data_prep_writes_with_the_format_packages_names():
    from data_prep import imagenet, verify
    from pipeline.format import layout

    # One definition of each name, used on both sides.
    assert imagenet.SPLITS is layout.SPLITS
    assert imagenet.MANIFEST is layout.MANIFEST
    assert imagenet.shard_name is layout.shard_name
    assert verify.missing_shards is layout.missing_shards


def test_no_pipeline_module_shadows_the_standard_library():
    """pipeline/train.py runs as a script (the deepspeed launcher's path), so pipeline/ is first on sys.path and a
    module named like a standard one (types.py, logging.py) would replace it for every library."""
    names = {p.stem for p in (ROOT / "pipeline").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert not names & set(sys.stdlib_module_names)


@pytest.mark.slow
def test_train_runs_as_a_module_and_as_a_script():
    for command in ([sys.executable, "-m", "pipeline.train"], [sys.executable, str(ROOT / "pipeline" / "train.py")]):
        proc = procs.run([*command, "--help"], capture_output=True, text=True, cwd="/", timeout=300)
        assert proc.returncode == 0
        assert "--deepspeed_config" in proc.stdout
        assert "--sync-bn" in proc.stdout
