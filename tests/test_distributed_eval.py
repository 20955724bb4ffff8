"""The evaluation harness on two real processes: ``torchrun`` and ``accelerate launch``, on the CPU.

Each launch runs the users' command, ``-m atedm.evaluation``, on the tiny SDXL pipeline saved to disk:
8 captions, 16 x 16 images, 1 step, batches of 2, configs full and tomesd:0.5 (whose FLOPs, counted by
rank 0 for the metrics, take a third of an AT-EDM preset's time), so each rank generates two batches per
config. The metric models come in the way the command line takes your own
(``--feature-extractor`` / ``--clip-scorer module:callable``): the stand-ins below, this module being on
the ranks' PYTHONPATH.

Which rank wrote what is read from the harness's own per-rank summary lines
(``[rank 1/2] full cfg 7: 4 generated, ...``): with every file present, writes that add up to the number
of files mean no image was written twice. Every launch runs under a timeout, and its whole process
group is killed afterwards, so a hang fails the test instead of blocking CI.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from atedm.evaluation import frechet_distance, gaussian_stats, shard_batches
from atedm.evaluation.cli import main
from tiny_models import tiny_sdxl_pipeline

TESTS = Path(__file__).resolve().parent
CAPTIONS = {image_id: f"a photo of object {image_id}" for image_id in (42, 73, 139, 285, 632, 724, 776, 785)}
IMAGE_IDS = sorted(CAPTIONS)
CONFIGS = {"full": "full", "tomesd:0.5": "tomesd-0.5"}  # name: folder
BATCH_SIZE = 2
TOTAL = len(CONFIGS) * len(IMAGE_IDS)
LAUNCH_TIMEOUT_S = 240  # a launch takes 20-60 s on a busy 2-core machine
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RANK_SUMMARY = re.compile(r"\[rank (\d+)/2\] (\S+) cfg 7: (\d+) generated")


class ChannelMoments:
    """FID stand-in: each channel's mean and spread (6-d, so 8 images give a full-rank covariance)."""

    def __init__(self, device):
        self.name = f"test: RGB channel moments on {device}"

    def __call__(self, images):
        pixels = [np.asarray(image.convert("RGB"), dtype=np.float64) / 255 for image in images]
        return np.stack([np.concatenate([p.mean(axis=(0, 1)), p.std(axis=(0, 1))]) for p in pixels])


class Brightness:
    """CLIP stand-in: the image's mean brightness, whatever the caption."""

    name = "test: mean brightness"

    def __init__(self, device):
        pass

    def __call__(self, images, captions):
        return np.array([np.asarray(image.convert("RGB"), dtype=np.float64).mean() / 255 for image in images])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    tiny_sdxl_pipeline().save_pretrained(root / "pipeline")
    annotations = [{"id": index, "image_id": image_id, "caption": caption}
                   for index, (image_id, caption) in enumerate(CAPTIONS.items())]
    (root / "captions.json").write_text(json.dumps({"annotations": annotations}))
    (root / "reference").mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / "reference" / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def launch_env(workspace):
    """The ranks' environment: this checkout and this module importable, one thread each, no config files."""
    env = {name: value for name, value in os.environ.items()
           if name not in LAUNCHER_VARIABLES and not name.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]), OMP_NUM_THREADS="1",
               HF_HOME=str(workspace / "hf"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def harness_args(workspace, out, **changes):
    options = {"--model": str(workspace / "pipeline"), "--captions": str(workspace / "captions.json"),
               "--reference": str(workspace / "reference"), "--out": str(out), "--configs": ",".join(CONFIGS),
               "--cfg-scales": "7", "--num-images": str(len(IMAGE_IDS)), "--steps": "1", "--height": "16",
               "--width": "16", "--batch-size": str(BATCH_SIZE), "--device": "cpu", "--dtype": "float32",
               "--feature-extractor": f"{__name__}:ChannelMoments", "--clip-scorer": f"{__name__}:Brightness",
               "--wait-timeout": "120"}
    options.update(changes)
    return [item for option, value in options.items() for item in (option, value)]


def torchrun(args):
    # --standalone: a local rendezvous on a free port.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "atedm.evaluation", *args]


def start(command, env, log):
    with open(log, "w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def finish(process, log):
    """Wait for a launcher, then kill whatever is left of its process group; returns (exit status, output)."""
    try:
        process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{process.args[2]} did not finish in {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.returncode, log.read_text()


def launch(command, env, log):
    return finish(start(command, env, log), log)


def image_stamps(out):
    """{'<config>/<file>': (inode, mtime)} of every PNG: a rewritten file gets a new inode (os.replace)."""
    return {f"{path.parent.parent.name}/{path.name}": (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in out.glob("*/cfg7/*.png")}


def images(folder, image_ids=IMAGE_IDS):
    return {f"{folder}/{image_id}.png" for image_id in image_ids}


def every_image():
    return {image for folder in CONFIGS.values() for image in images(folder)}


def shard(rank):
    """The image files rank ``rank`` of 2 owns in each config."""
    image_ids = [image_id for batch in shard_batches(IMAGE_IDS, rank, 2, BATCH_SIZE) for image_id in batch]
    return {image for folder in CONFIGS.values() for image in images(folder, image_ids)}


def writes_per_rank(output):
    """{(rank, config folder): images written}, from the harness's summary lines."""
    writes = {}
    for rank, config, count in RANK_SUMMARY.findall(output):
        key = int(rank), CONFIGS[config]
        assert key not in writes, f"rank {rank} reported {config} twice"
        writes[key] = int(count)
    return writes


def leftovers(out):
    return [path for path in out.rglob("*") if path.is_file() and path.name.startswith(".")]


def load(paths):
    loaded = []
    for path in paths:
        with Image.open(path) as image:
            loaded.append(image.convert("RGB"))
    return loaded


def assert_metrics_computed_once_over_all_images(workspace, out, output):
    assert output.count("results in ") == 1, "the metrics were computed by more than one process, or by none"
    results = json.loads((out / "metrics.json").read_text())
    assert results["fid_features"] == "test: RGB channel moments on cpu"
    reference = ChannelMoments("cpu")(load(sorted((workspace / "reference").iterdir())))
    rows = {row["config"]: row for row in results["results"]}
    assert list(rows) == list(CONFIGS)
    for config, row in rows.items():
        # Recomputed here from every image on disk, both ranks' shares.
        generated = load(out / CONFIGS[config] / "cfg7" / f"{image_id}.png" for image_id in IMAGE_IDS)
        assert all(image.size == (16, 16) for image in generated)
        assert row["num_images"] == len(IMAGE_IDS)
        assert row["clip_score"] == pytest.approx(Brightness("cpu")(generated, []).mean(), rel=1e-12)
        fid = frechet_distance(*gaussian_stats(ChannelMoments("cpu")(generated)), *gaussian_stats(reference))
        assert row["fid"] == pytest.approx(fid, rel=1e-9)
    with open(out / "metrics.csv") as handle:
        assert [row["config"] for row in csv.DictReader(handle)] == list(CONFIGS)


def test_torchrun_rank_killed_mid_run_then_rerun_loses_no_image_and_rewrites_none(workspace, launch_env, tmp_path):
    out = tmp_path / "out"
    command = torchrun(harness_args(workspace, out))
    process = start(command, launch_env, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not any(out.glob("*/cfg7/*.png")):
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no image after the launch timeout"
            time.sleep(0.02)
        [victim] = [worker for worker in psutil.Process(process.pid).children() if worker.environ().get("RANK") == "1"]
        victim.kill()  # SIGKILL: a crash, no cleanup; torchrun then stops rank 0
    finally:
        status, _ = finish(process, tmp_path / "killed.log")
    assert status != 0
    before = image_stamps(out)
    assert 0 < len(before) < TOTAL, f"the kill came too late: {len(before)} of {TOTAL} images"
    # What a writer killed mid-write leaves, for an image still missing: the owning rank removes it.
    folder, name = next(image.split("/") for image in sorted(every_image() - set(before))
                        if (out / image.split("/")[0] / "cfg7").is_dir())
    (out / folder / "cfg7" / f".{name}.99999-deadbeef.tmp").write_bytes(b"half a png")

    status, output = launch(command, launch_env, tmp_path / "rerun.log")
    assert status == 0, output[-3000:]
    after = image_stamps(out)
    assert set(after) == every_image() and not leftovers(out)
    assert {name: after[name] for name in before} == before  # kept, not rewritten
    # Each rank wrote exactly its missing images: none twice, none of another rank's.
    assert writes_per_rank(output) == {(rank, folder): len((images(folder) & shard(rank)) - set(before))
                                       for rank in (0, 1) for folder in CONFIGS.values()}
    assert_metrics_computed_once_over_all_images(workspace, out, output)


def test_accelerate_launch_two_processes_share_the_work(workspace, launch_env, tmp_path):
    out = tmp_path / "out"
    # accelerate's own launch module: the `accelerate` script also imports its other commands, and one
    # of them imports timm, which fails where torchvision cannot be installed. --multi_gpu is accelerate's
    # torchrun path, and the one that starts several processes on a CPU-only machine (--cpu starts one).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "atedm.evaluation", *harness_args(workspace, out)]
    status, output = launch(command, launch_env, tmp_path / "accelerate.log")
    assert status == 0, output[-3000:]
    assert set(image_stamps(out)) == every_image() and not leftovers(out)
    assert writes_per_rank(output) == {(rank, folder): len(images(folder) & shard(rank))
                                       for rank in (0, 1) for folder in CONFIGS.values()}
    assert_metrics_computed_once_over_all_images(workspace, out, output)


def test_bad_input_stops_every_torchrun_rank_before_any_image(workspace, launch_env, tmp_path):
    # The reference folder only matters to rank 0's metrics, yet every rank must refuse it: a rank that
    # did not would generate while the other exits.
    args = harness_args(workspace, tmp_path / "out", **{"--reference": str(tmp_path / "no-such-folder")})
    refused = r"error: reference folder \S+no-such-folder does not exist"
    status, output = launch(torchrun(args), launch_env, tmp_path / "bad.log")
    # torchrun stops the other rank as soon as one fails, so the second error line may never be printed.
    assert status != 0 and 1 <= len(re.findall(refused, output)) <= 2, output[-3000:]
    assert not (tmp_path / "out").exists()
    # Each rank on its own (the rank variables a launcher sets, no launcher to stop it): both refuse.
    for rank in (0, 1):
        env = {**launch_env, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        status, output = launch([sys.executable, "-m", "atedm.evaluation", *args], env, tmp_path / f"rank{rank}.log")
        assert status == 2 and len(re.findall(refused, output)) == 1, output[-3000:]
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--captions", "{tmp}/missing.json", r"captions file \S+missing.json does not exist"),
    ("--captions", "{tmp}/not-json.json", r"captions file \S+not-json.json is not valid JSON"),
    ("--captions", "{tmp}/no-annotations.json", r"captions file \S+no-annotations.json has no 'annotations' list"),
    ("--reference", "{tmp}/no-such-folder", r"reference folder \S+no-such-folder does not exist"),
    ("--configs", "full,e", r"unknown config 'e'"),
    ("--batch-size", "0", r"batch_size must be an int >= 1; got 0"),
    ("--feature-extractor", "channel moments", r"feature_extractor_factory must be 'module:callable'"),
    ("--clip-scorer", f"{__name__}:Nothing", rf"--clip-scorer {__name__}:Nothing: module {__name__} has no callable 'Nothing'"),
])
def test_bad_input_is_one_error_line_before_any_image(workspace, tmp_path, monkeypatch, capsys, option, value, message):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "not-json.json").write_text('{"annotations": [')
    (tmp_path / "no-annotations.json").write_text('{"images": []}')
    with pytest.raises(SystemExit) as exit_info:
        main(harness_args(workspace, tmp_path / "out", **{option: value.format(tmp=tmp_path)}))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not (tmp_path / "out").exists()
