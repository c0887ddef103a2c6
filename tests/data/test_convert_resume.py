"""kelix data convert jobs: parallel = serial, a killed or damaged conversion resumed = an uninterrupted one."""

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from kelix.cli import main as kelix
from tests.data.convert_helpers import convert, images, read_back

SPECS = {f"{i}.png": ((20 * i, 255 - 20 * i, 7 * i), (8 + i, 16 - i // 2)) for i in range(8)}


def table(tmp_path, n=23):
    images(tmp_path / "img", SPECS)
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(n):  # every 5th row's image is missing, every 7th undecodable
            w.writerow(["gone.png" if i % 5 == 4 else "bad.jpg" if i % 7 == 6 else f"{i % 8}.png", f"caption {i}"])
    return path


def shard_bytes(out) -> dict:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(str(out), "*.tar")))}


def without_resume_count(manifest):
    return {**manifest, "totals": {k: v for k, v in manifest["totals"].items() if k != "resumed_shards"}}


def test_parallel_workers_write_the_same_shards_as_one(tmp_path):
    path = table(tmp_path)
    listed = tmp_path / "more.json"  # a JSON list: its rows travel to the workers with each task
    listed.write_text(json.dumps([{"image": f"{i}.png", "caption": f"listed {i}"} for i in range(5)]))
    one = convert("pairs", [path, listed], tmp_path / "one", images_root=str(tmp_path / "img"), shard_size=4)
    two = convert("pairs", [path, listed], tmp_path / "two", images_root=str(tmp_path / "img"), shard_size=4,
                  workers=2)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two") and len(shard_bytes(tmp_path / "one")) == 7
    assert without_resume_count(one) == without_resume_count(two)
    assert one["totals"]["samples"] + one["totals"]["skipped"] == 28
    assert one["skipped_by_reason"] == {"corrupt_image": 3, "missing_image": 4}
    samples = read_back(tmp_path / "two", two)
    assert len(samples) == 21 and [s.turns[0].parts[1].text for s in samples[-5:]] == [f"listed {i}" for i in range(5)]


def test_a_damaged_conversion_resumed_gives_the_same_shards(tmp_path):
    path = table(tmp_path)
    full = convert("pairs", [path], tmp_path / "full", images_root=str(tmp_path / "img"), shard_size=3)
    want = shard_bytes(tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    rec = part / ".convert-pairs"
    os.remove(part / "pairs-00001.tar")  # never written
    os.remove(rec / "00001.json")
    with open(part / "pairs-00002.tar", "r+b") as f:  # killed mid-copy: shorter than its record says
        f.truncate(5000)
    (rec / "00003.json").write_text(json.dumps({"version": 1, "shards": {"pairs-00003.tar": {"samples": 2}}}))
    (part / "pairs-00004.tar.tmp").write_bytes(b"half a tar")  # killed while writing shard 4 (never renamed)
    os.remove(part / "pairs-00004.tar")
    os.remove(rec / "00004.json")
    os.remove(part / "pairs.manifest.json")
    again = convert("pairs", [path], part, images_root=str(tmp_path / "img"), shard_size=3)
    assert shard_bytes(part) == want
    assert again["totals"]["resumed_shards"] == len(want) - 4  # 1, 2, 3 and 4 redone, the others kept
    assert without_resume_count(again) == without_resume_count(full)
    assert not glob.glob(str(part / "*.tmp")) or open(part / "pairs-00004.tar.tmp", "rb").read() != b"half a tar"
    read_back(part, again)


def test_a_killed_conversion_resumed_gives_the_same_shards(tmp_path):
    path = table(tmp_path, n=60)
    args = ["data", "convert", "--format", "pairs", "--input", str(path), "--images-root", str(tmp_path / "img"),
            "--shard-size", "1", "--quiet"]
    assert kelix([*args, "--out", str(tmp_path / "full")]) == 0
    want = shard_bytes(tmp_path / "full")
    code = "import sys; from kelix.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(tmp_path / "part")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "part" / ".convert-pairs"
    try:  # kill it as soon as its first shard is recorded, wherever it is then
        while proc.poll() is None and len(glob.glob(str(records / "*.json"))) < 2:
            pass
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len(glob.glob(str(records / "*.json")))
    print("killed after", done_before, "of 60 shard records")
    assert kelix([*args, "--out", str(tmp_path / "part")]) == 0
    assert shard_bytes(tmp_path / "part") == want
    with open(tmp_path / "part" / "pairs.manifest.json") as f:
        m = json.load(f)
    assert m["totals"]["resumed_shards"] <= done_before
    assert without_resume_count(m)["totals"] == without_resume_count(
        json.load(open(tmp_path / "full" / "pairs.manifest.json")))["totals"]


def test_another_conversion_into_the_same_folder_is_refused(tmp_path, capsys):
    path = table(tmp_path, n=5)
    convert("pairs", [path], tmp_path / "out", images_root=str(tmp_path / "img"), shard_size=3)
    with pytest.raises(ValueError, match="holds shards 'pairs-\\*' of another conversion"):
        convert("pairs", [path], tmp_path / "out", images_root=str(tmp_path / "img"), shard_size=2)
    assert kelix(["data", "convert", "--format", "pairs", "--input", str(tmp_path / "nope.csv"), "--out",
                  str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kelix data convert: input {tmp_path / 'nope.csv'}: no such file or folder"]


def test_data_validate_and_the_validate_shards_alias(tmp_path, capsys):
    path = table(tmp_path, n=6)
    convert("pairs", [path], tmp_path / "out", images_root=str(tmp_path / "img"), shard_size=4)
    pattern = str(tmp_path / "out" / "*.tar")
    assert kelix(["data", "validate", pattern]) == 0
    out = capsys.readouterr().out
    assert "5 valid sample(s) in 2 shard(s): caption=5" in out and "per source: pairs.csv=5" in out
    from webdataset import TarWriter

    TarWriter(str(tmp_path / "out" / "pairs-00001.tar")).close()  # rewritten without its one sample
    assert kelix(["validate-shards", pattern]) == 1
    out = capsys.readouterr().out
    assert "4 valid sample(s)" in out and "skipped: truncated_shard=1" in out


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: ~16 s of imports
def test_ctrl_c_is_one_line_and_the_rerun_finishes(tmp_path, workers):
    path = table(tmp_path, n=80)
    args = ["data", "convert", "--format", "pairs", "--input", str(path), "--images-root", str(tmp_path / "img"),
            "--shard-size", "1", "--workers", str(workers), "--quiet", "--out", str(tmp_path / "out")]
    code = "import sys; from kelix.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    records = tmp_path / "out" / ".convert-pairs"
    while proc.poll() is None and len(glob.glob(str(records / "*.json"))) < 3:
        pass
    if workers > 1 and os.path.exists(f"/proc/{proc.pid}/task/{proc.pid}/children"):
        # the workers ignore SIGINT from their start (a worker interrupted while still importing prints
        # a traceback): read their ignored-signal mask
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = f.read().split()
        masks = []
        for child in children:
            try:
                with open(f"/proc/{child}/status") as f:
                    masks += [int(line.split()[1], 16) for line in f if line.startswith("SigIgn:")]
            except FileNotFoundError:  # a worker that has just ended
                pass
        assert masks and all(m >> (signal.SIGINT - 1) & 1 for m in masks), (children, masks)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    err = proc.communicate()[1]
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the interrupt arrived")  # nothing to check then
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "kelix data convert: interrupted; finished shards are kept: rerun the same command to resume"], err
    assert kelix([*args, "--workers", "1"]) == 0  # the last --workers wins; the plan does not depend on it
    with open(tmp_path / "out" / "pairs.manifest.json") as f:
        assert json.load(f)["totals"]["samples"] == 80 - 16 - 9  # 16 rows i % 5 == 4, 9 more i % 7 == 6
