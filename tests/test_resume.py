"""Crash safety: after kill -9 at any point, the same command finishes with output identical to an
uninterrupted run, keeping what was finished."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from data_prep.imagenet import CHECKS_JOURNAL, STATE_DIR, PrepError, prepare
from data_prep.journal import Journal
from data_prep.synthetic import generate
from tests import procs
from tests.shardsets import tree_bytes

ARGS = dict(train_shards=6, val_shards=2, seed=3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A tree big enough that the check pass takes a few seconds on one worker."""
    root = tmp_path_factory.mktemp("resume") / "src"
    return generate(
        str(root), classes=4, train_per_class=160, val_per_class=10, min_side=160, max_side=320, quirks=True
    )


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> dict[str, bytes]:
    """Every output byte of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    prepare(str(tree), str(out), workers=2, **ARGS)
    return tree_bytes(out)


def cli(src: Path, out: Path, workers: int) -> list[str]:
    """The prep command line for these tests."""
    return [
        sys.executable,
        "-m",
        "data_prep.imagenet",
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--train-shards",
        str(ARGS["train_shards"]),
        "--val-shards",
        str(ARGS["val_shards"]),
        "--seed",
        str(ARGS["seed"]),
    ]


# Runs prep in one process and sends itself SIGKILL halfway through writing the third shard, leaving
# a published first two shards, a partial third file, and journals exactly as a real crash would.
KILL_MID_SHARD = textwrap.dedent("""
    import os, signal, sys
    from data_prep import imagenet
    real_example, written = imagenet._item_example, []
    def dying_example(root, item, resize):
        written.append(item)
        if len(written) == 2 * {per_shard} + 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_example(root, item, resize)
    imagenet._item_example = dying_example
    sys.exit(imagenet.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_shard_write_then_resume(tree, reference, tmp_path):
    out = tmp_path / "out"
    per_shard = (4 * (160 + 8)) // ARGS["train_shards"]  # usable train images: 160 + 8 quirks per class
    proc = procs.run(
        [sys.executable, "-c", KILL_MID_SHARD.format(per_shard=per_shard), *cli(tree, out, 1)[3:]],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL
    published = sorted(p.name for p in out.glob("train-*-of-*") if not p.name.endswith(".idx"))
    assert published == ["train-00000-of-00006", "train-00001-of-00006"]
    assert list(out.glob(".train-00002-of-00006.*.partial")), "the crash should leave a partial shard"
    assert not (out / "manifest.json").exists()
    before = {p: (out / p).stat().st_mtime_ns for p in published}
    resumed = procs.run(cli(tree, out, 2), capture_output=True, text=True, check=True)
    assert tree_bytes(out) == reference, resumed.stderr
    assert {p: (out / p).stat().st_mtime_ns for p in published} == before, "finished shards must be kept, not redone"


@pytest.mark.slow
def test_kill_9_during_the_check_pass_then_resume(tree, reference, tmp_path):
    out = tmp_path / "out"
    proc = procs.start(cli(tree, out, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / STATE_DIR / CHECKS_JOURNAL
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    checked = len(Journal(journal).entries)
    assert checked >= 1
    resumed = procs.run(cli(tree, out, 2), capture_output=True, text=True, check=True)
    assert tree_bytes(out) == reference, resumed.stderr


def test_torn_journal_line_is_dropped_and_appends_stay_whole(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    journal = Journal(path)
    assert journal.entries == [{"a": 1}, {"b": 2}]
    journal.append({"d": 4})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": 2}, {"d": 4}]


def test_damaged_finished_output_is_repaired_on_rerun(tree, reference, tmp_path):
    out = tmp_path / "out"
    prepare(str(tree), str(out), workers=1, **ARGS)
    (out / "train-00004-of-00006").unlink()
    (out / "validation-00001-of-00002.idx").unlink()
    prepare(str(tree), str(out), workers=1, **ARGS)
    assert tree_bytes(out) == reference


def test_interrupted_run_cannot_resume_with_other_settings(tree, tmp_path):
    out = tmp_path / "out"
    recorded = prepare(str(tree), str(out), workers=1, **ARGS)["settings"]
    (out / "manifest.json").unlink()  # as if the run had died before publishing its manifest
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / "settings.json").write_text(json.dumps(recorded))
    with pytest.raises(PrepError, match=r"settings.json: an interrupted run used other settings \(seed\); rerun it"):
        prepare(str(tree), str(out), workers=1, **{**ARGS, "seed": 4})


def test_out_that_is_a_file_is_refused(tree, tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(PrepError, match=r"--out .*out: is a file; give a folder"):
        prepare(str(tree), str(tmp_path / "out"), workers=1, **ARGS)


def test_foreign_shards_in_out_are_not_touched(tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000-of-00001").write_bytes(b"someone else's data")
    with pytest.raises(PrepError, match=r"already holds shards this tool did not start"):
        prepare(str(tree), str(out), workers=1, **ARGS)
    assert (out / "train-00000-of-00001").read_bytes() == b"someone else's data"
