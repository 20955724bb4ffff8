"""The COCO evaluation harness (atedm.evaluation) end to end on a tiny SDXL pipeline saved to disk.

32 x 32 images, 2 steps, 5 of 6 captions from a captions file written here, reference images written
here; FID features and CLIP scores injected (the real ones need torchvision and downloads).

The default metric backends (clean-fid, torch-fidelity, open_clip) are tested up to their downloads,
which are pointed at a local socket that never answers or replaced by a function that raises: they must
fail fast with a clear error and leave no file behind. They run when the packages are installed; where
torchvision itself cannot be imported (e.g. a CUDA torchvision wheel beside a CPU torch), a stand-in
torchvision module lets the libraries import, since nothing before the downloads calls into it.
"""

import csv
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import atedm
from atedm.evaluation import EvalSettings, RankInfo, frechet_distance, gaussian_stats, generate_images, run_evaluation
from atedm.evaluation import backends, tflops
from atedm.evaluation.cli import build_parser, main, settings_from_args
from atedm.evaluation.generate import rank_from_env, write_png_atomically
from atedm.evaluation.prompts import image_seed, load_coco_captions, select_prompts, shard_batches
from atedm.evaluation.settings import parse_config
from tiny_models import tiny_sdxl_pipeline

# Listed out of order; 1000 has no caption; annotation ids decide which caption an image keeps.
CAPTIONS = {
    724: [(30, "a stop sign on a street corner"), (12, "a red stop sign by the road\n")],
    139: [(5, "a living room with a television"), (7, "a room with chairs")],
    785: [(1, "a woman skiing down a slope")],
    285: [(40, "a big brown bear"), (41, "a bear sitting in the grass")],
    632: [(90, "a bedroom with a bed and a window")],
    776: [(66, "three teddy bears"), (65, "teddy bears on a shelf ")],
}
EXPECTED_PROMPTS = [(139, "a living room with a television"), (285, "a big brown bear"),
                    (632, "a bedroom with a bed and a window"), (724, "a red stop sign by the road"),
                    (776, "teddy bears on a shelf")]
CONFIGS = ("full", "c", "tomesd:0.5")
SCALES = (4.0, 7.0)


class PixelProjection:
    """FID features: a fixed random projection of 8 x 8 downsampled pixels (4-d, so 5 images give a full-rank covariance)."""

    name = "test: random projection of 8x8 pixels"

    def __init__(self, dim=4):
        self.matrix = np.random.default_rng(0).standard_normal((8 * 8 * 3, dim))

    def __call__(self, images):
        pixels = [np.asarray(image.resize((8, 8), Image.BILINEAR), dtype=np.float64).ravel() / 255 for image in images]
        return np.stack(pixels) @ self.matrix


class RecordingScorer:
    """CLIP stand-in: mean brightness; records which caption came with which image file."""

    name = "test: mean brightness"

    def __init__(self):
        self.pairs = []

    def __call__(self, images, captions):
        self.pairs += [(image.info.get("caption"), caption) for image, caption in zip(images, captions)]
        return np.array([np.asarray(image, dtype=np.float64).mean() / 255 for image in images])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny_sdxl_pipeline().save_pretrained(root / "pipeline")
    images = [{"id": image_id, "file_name": f"{image_id:012d}.jpg"} for image_id in [*CAPTIONS, 1000]]
    annotations = [{"id": ann_id, "image_id": image_id, "caption": caption}
                   for image_id, captions in CAPTIONS.items() for ann_id, caption in captions]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    rng = np.random.default_rng(1)
    (root / "reference").mkdir()
    for index in range(6):  # a different size than the generated images, as COCO's are
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "reference" / f"{index:012d}.jpg")
    return root


def make_settings(workspace, out, **changes):
    values = dict(model=str(workspace / "pipeline"), captions=workspace / "captions.json", reference=workspace / "reference",
                  out=workspace / out, configs=CONFIGS, cfg_scales=SCALES, num_images=5, seed=0, steps=2, height=32,
                  width=32, batch_size=2, device="cpu", dtype="float32")
    values.update(changes)
    return EvalSettings(**values)


@pytest.fixture(scope="module")
def reference_run(workspace):
    """One uninterrupted run of the whole harness: every config and scale, metrics included."""
    settings = make_settings(workspace, "uninterrupted")
    scorer = RecordingScorer()
    results = run_evaluation(settings, feature_extractor=PixelProjection(), clip_scorer=scorer, progress=False)
    return settings, results, scorer


def image_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


def assert_same_images(folder_a, folder_b, names=None):
    names = names or image_files(folder_a)
    assert names
    for name in names:
        assert (folder_a / name).read_bytes() == (folder_b / name).read_bytes(), name


def temp_files(root):
    return [os.path.join(path, name) for path, _, names in os.walk(root) for name in names if name.endswith(".tmp")]


# --- the Frechet distance ------------------------------------------------------------------------

def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    # Commuting (diagonal) covariances: d = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # General SPD covariances: Tr sqrt(S1 S2) = Tr sqrt(S1^(1/2) S2 S1^(1/2)), the symmetric form.
    def spd(n):
        m = rng.standard_normal((n, n))
        return m @ m.T + 0.1 * np.eye(n)

    def sym_sqrt(m):
        values, vectors = np.linalg.eigh(m)
        return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T

    s1, s2 = spd(6), spd(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    root = sym_sqrt(s1)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sym_sqrt(root @ s2 @ root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
    # One dimension: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Sample statistics: a set against itself is 0, against a shifted copy the squared shift.
    features = rng.standard_normal((50, 4))
    assert abs(frechet_distance(*gaussian_stats(features), *gaussian_stats(features))) < 1e-9
    assert frechet_distance(*gaussian_stats(features), *gaussian_stats(features + 2.0)) == pytest.approx(16.0, rel=1e-6)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(features[:1])


# --- prompts, seeds, shards ----------------------------------------------------------------------

def test_one_caption_per_image_chosen_deterministically(workspace, tmp_path):
    prompts = select_prompts(load_coco_captions(workspace / "captions.json"), 5)
    assert [(p.image_id, p.caption) for p in prompts] == EXPECTED_PROMPTS
    # The same choice whatever the order of the file.
    data = json.loads((workspace / "captions.json").read_text())
    data["annotations"].reverse()
    (tmp_path / "reversed.json").write_text(json.dumps(data))
    assert select_prompts(load_coco_captions(tmp_path / "reversed.json"), 5) == prompts
    assert len(load_coco_captions(workspace / "captions.json")) == 6  # image 1000 has no caption
    with pytest.raises(ValueError, match="asked for 7 images but the captions file has 6"):
        select_prompts(load_coco_captions(workspace / "captions.json"), 7)


def test_image_seed_is_stable_and_distinct():
    assert image_seed(0, 139) == image_seed(0, 139)
    seeds = {image_seed(base, image_id) for base in range(3) for image_id in range(200)}
    assert len(seeds) == 600 and all(0 <= seed < 2**63 for seed in seeds)


@pytest.mark.parametrize("num_items", [1, 5, 17])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_shards_cover_each_item_exactly_once(num_items, world_size, batch_size):
    items = list(range(num_items))
    shards = [shard_batches(items, rank, world_size, batch_size) for rank in range(world_size)]
    dealt = sorted(item for shard in shards for batch in shard for item in batch)
    assert dealt == items
    if batch_size == 1:
        assert [item for batch in shards[1 % world_size] for item in batch] == items[1 % world_size :: world_size]
    # A batch is the same consecutive slice whatever the world size (so the same pixels on resume).
    everything = shard_batches(items, 0, 1, batch_size)
    assert sorted(batch for shard in shards for batch in shard) == everything


def test_rank_from_launcher_environment():
    assert rank_from_env({}) == RankInfo(0, 1, None)
    assert rank_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == RankInfo(3, 4, 1)
    assert rank_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == RankInfo(1, 2, 1)
    with pytest.raises(ValueError, match="inconsistent"):
        rank_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        rank_from_env({"RANK": "x", "WORLD_SIZE": "2"})


# --- the whole harness ---------------------------------------------------------------------------

def test_run_writes_every_image_and_no_temp_file(reference_run):
    settings, _, _ = reference_run
    expected = [f"{image_id}.png" for image_id, _ in sorted(EXPECTED_PROMPTS)]
    for config in ("full", "c", "tomesd-0.5"):
        for scale in ("cfg4", "cfg7"):
            folder = settings.out / config / scale
            assert image_files(folder) == expected
            with Image.open(folder / "724.png") as image:
                assert image.size == (32, 32) and np.asarray(image).std() > 0
                assert image.info["caption"] == "a red stop sign by the road" and image.info["config"] == config.replace("-", ":")
    assert not temp_files(settings.out)
    # The configs really differ from each other (the patches ran).
    assert (settings.out / "c/cfg7/724.png").read_bytes() != (settings.out / "full/cfg7/724.png").read_bytes()
    assert (settings.out / "tomesd-0.5/cfg7/724.png").read_bytes() != (settings.out / "full/cfg7/724.png").read_bytes()


def test_metrics_json_csv_and_plots(reference_run):
    settings, results, scorer = reference_run
    rows = results["results"]
    assert [(row["config"], row["cfg_scale"]) for row in rows] == [(c, s) for c in CONFIGS for s in SCALES]
    assert json.loads((settings.out / "metrics.json").read_text())["results"] == rows
    with open(settings.out / "metrics.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [(row["config"], float(row["cfg_scale"])) for row in csv_rows] == [(c, s) for c in CONFIGS for s in SCALES]
    for row, csv_row in zip(rows, csv_rows):
        assert row["num_images"] == 5
        assert np.isfinite(row["fid"]) and row["fid"] > 0  # generated images vs random-noise references
        assert float(csv_row["fid"]) == pytest.approx(row["fid"])
    # Every image scored once, with its own caption.
    assert len(scorer.pairs) == len(rows) * 5
    assert all(stored == given for stored, given in scorer.pairs)
    # CLIP = the mean of the scorer over the set.
    brightness = [np.asarray(Image.open(settings.out / "c" / "cfg4" / f"{image_id}.png").convert("RGB"), dtype=np.float64).mean() / 255
                  for image_id, _ in EXPECTED_PROMPTS]
    assert rows[2]["clip_score"] == pytest.approx(np.mean(brightness))
    # TFLOPs at the run's latent size (VAE factor 2 here: 32 px -> 16 x 16 latent, i.e. 128 px for factor 8).
    flops = {row["config"]: row for row in rows}
    pipe_config = json.loads((settings.out.parent / "pipeline" / "unet" / "config.json").read_text())
    assert flops["full"]["tflops_per_step"] == pytest.approx(atedm.flops_per_step(pipe_config, None, 128, 128, 2).unet_tflops)
    assert flops["c"]["overhead_tflops"] > 0
    assert flops["tomesd:0.5"]["flops_counted"] and flops["tomesd:0.5"]["tflops_per_step"] < flops["full"]["tflops_per_step"]
    assert flops["c"]["tflops_per_step"] < flops["full"]["tflops_per_step"]
    for name in ("fid_vs_tflops.png", "fid_vs_clip.png"):
        with Image.open(settings.out / name) as plot:
            assert plot.format == "PNG" and plot.size[0] > 300


def test_fid_of_a_set_against_itself_is_zero(reference_run, tmp_path):
    settings, results, _ = reference_run
    out = tmp_path / "copy"
    shutil.copytree(settings.out, out)
    own = settings.out / "full" / "cfg7"
    rows = run_evaluation(make_settings(settings.out.parent, out, reference=own), stage="metrics",
                          feature_extractor=PixelProjection(), clip_scorer=RecordingScorer(), progress=False)["results"]
    fid = {(row["config"], row["cfg_scale"]): row["fid"] for row in rows}
    assert abs(fid[("full", 7.0)]) < 1e-9
    assert all(value > 1e-6 for key, value in fid.items() if key != ("full", 7.0))


def test_resume_after_interruption_equals_uninterrupted_run(reference_run, workspace):
    reference_settings, reference_results, _ = reference_run
    settings = make_settings(workspace, "interrupted", configs=("full",), cfg_scales=(7.0,))
    folder = settings.out / "full" / "cfg7"

    class Interrupted(Exception):
        pass

    def interrupt_after_two(path, saved=[]):
        saved.append(path)
        if len(saved) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_evaluation(settings, feature_extractor=PixelProjection(), clip_scorer=RecordingScorer(),
                       on_image_saved=interrupt_after_two, progress=False)
    first = image_files(folder)
    assert len(first) == 2 and not temp_files(settings.out)
    stamps = {name: (os.stat(folder / name).st_ino, os.stat(folder / name).st_mtime_ns) for name in first}
    stale = folder / ".776.png.999-deadbeef.tmp"  # what a killed writer leaves
    stale.write_bytes(b"half a png")

    written = []
    results = run_evaluation(settings, feature_extractor=PixelProjection(), clip_scorer=RecordingScorer(),
                             on_image_saved=written.append, progress=False)
    assert len(written) == 3 and not {path.name for path in written} & set(first)
    assert {name: (os.stat(folder / name).st_ino, os.stat(folder / name).st_mtime_ns) for name in first} == stamps
    assert not temp_files(settings.out)
    assert_same_images(reference_settings.out / "full" / "cfg7", folder)
    expected = next(row for row in reference_results["results"] if row["config"] == "full" and row["cfg_scale"] == 7.0)
    assert results["results"] == [expected]
    # A third run finds nothing to do.
    assert generate_images(settings, progress=False).written == 0


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    image = Image.new("RGB", (8, 8), "red")
    original_save = Image.Image.save

    seen_while_writing = []

    def save_then_fail(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        fp.flush()
        seen_while_writing.append(sorted(os.listdir(tmp_path)))
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_png_atomically(image, tmp_path / "1.png")
    # Mid-write only a hidden temp file exists (a reader or a killed run never sees a partial 1.png) ...
    assert len(seen_while_writing[0]) == 1 and seen_while_writing[0][0].startswith(".1.png.")
    # ... and an interruption removes it.
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(Image.Image, "save", original_save)
    write_png_atomically(image, tmp_path / "1.png", {"caption": "red"})
    assert os.listdir(tmp_path) == ["1.png"]
    with Image.open(tmp_path / "1.png") as saved:
        assert saved.info["caption"] == "red" and saved.getpixel((0, 0)) == (255, 0, 0)


def test_two_ranks_generate_each_image_once_and_identically(reference_run, workspace):
    reference_settings, _, _ = reference_run
    settings = make_settings(workspace, "sharded", configs=("full", "tomesd:0.5"), cfg_scales=(7.0,))
    written = {0: [], 1: []}
    extractors = dict(feature_extractor=PixelProjection(), clip_scorer=RecordingScorer(), progress=False)
    # Rank 0 of the default stage generates its share, then waits for rank 1's images (in vain here).
    with pytest.raises(TimeoutError, match=r"still missing \{'full/cfg7': 2, 'tomesd-0.5/cfg7': 2\}.*--stage metrics"):
        run_evaluation(replace(settings, wait_timeout_s=0.0), ranks=RankInfo(0, 2), on_image_saved=written[0].append, **extractors)
    assert run_evaluation(settings, ranks=RankInfo(1, 2), on_image_saved=written[1].append, **extractors) is None
    results = run_evaluation(settings, ranks=RankInfo(0, 2), on_image_saved=written[0].append, **extractors)
    assert [(row["config"], row["cfg_scale"]) for row in results["results"]] == [("full", 7.0), ("tomesd:0.5", 7.0)]
    for config in ("full", "tomesd-0.5"):
        per_rank = [sorted(p.name for p in written[rank] if p.parent.parent.name == config) for rank in (0, 1)]
        # Batches of 2: rank 0 takes [139, 285] and [776], rank 1 [632, 724].
        assert per_rank == [["139.png", "285.png", "776.png"], ["632.png", "724.png"]]
        # Same pixels as the single-process run: seeds per caption, ToMe's merges seeded too.
        assert_same_images(reference_settings.out / config / "cfg7", settings.out / config / "cfg7")


def test_same_seed_same_image_other_seed_differs(reference_run, workspace):
    reference_settings, _, _ = reference_run
    for seed in (0, 1):
        settings = make_settings(workspace, f"seed{seed}", configs=("c",), cfg_scales=(7.0,), num_images=2, seed=seed)
        generate_images(settings, progress=False)
    names = ["139.png", "285.png"]
    assert_same_images(reference_settings.out / "c" / "cfg7", workspace / "seed0" / "c" / "cfg7", names)
    for name in names:
        assert (workspace / "seed1" / "c" / "cfg7" / name).read_bytes() != (workspace / "seed0" / "c" / "cfg7" / name).read_bytes()


def test_command_line_generate_stage(reference_run, workspace, monkeypatch):
    reference_settings, _, _ = reference_run
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    out = workspace / "cli"
    main(["--model", str(workspace / "pipeline"), "--captions", str(workspace / "captions.json"), "--out", str(out),
          "--configs", "full", "--cfg-scales", "4", "--num-images", "5", "--steps", "2", "--height", "32", "--width", "32",
          "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--stage", "generate"])
    assert_same_images(reference_settings.out / "full" / "cfg4", out / "full" / "cfg4")


def test_command_line_takes_its_shard_from_the_launcher_environment(reference_run, workspace, monkeypatch):
    """What torchrun / accelerate launch set for the second of two processes: that rank's batches only."""
    reference_settings, _, _ = reference_run
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    out = workspace / "launched"
    main(["--model", str(workspace / "pipeline"), "--captions", str(workspace / "captions.json"), "--out", str(out),
          "--configs", "full", "--cfg-scales", "7", "--num-images", "5", "--steps", "2", "--height", "32", "--width", "32",
          "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--stage", "generate"])
    # Batches of 2 dealt over 2 ranks: rank 1 takes [632, 724], the same pixels as the one-process run.
    assert image_files(out / "full" / "cfg7") == ["632.png", "724.png"]
    assert_same_images(reference_settings.out / "full" / "cfg7", out / "full" / "cfg7", ["632.png", "724.png"])


# --- clear errors --------------------------------------------------------------------------------

def test_missing_metric_library_fails_before_generation(workspace, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cleanfid" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"clean-fid: pip install 'atedm\[eval\]'"):
        main(["--model", str(workspace / "pipeline"), "--captions", str(workspace / "captions.json"), "--out",
              str(tmp_path / "out"), "--reference", str(workspace / "reference"), "--device", "cpu"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("configs, message", [
    (("e",), "unknown config 'e'"),
    (("tomesd:1.5",), r"ToMe ratio must be in \(0, 0.75\]"),
    (("tomesd:x",), "is not a number"),
    (("c", "full", "c"), "the same config twice"),
    (("tomesd:0.5", "tomesd:0.50"), "the same config twice"),
    (("tomesd@e",), "match an AT-EDM preset"),
    (("tomesd@-1",), "must be a positive number"),
    (("tomesd@c", "tomesd@ c"), "the same config twice"),
])
def test_bad_configs_are_refused(workspace, configs, message):
    with pytest.raises(ValueError, match=message):
        make_settings(workspace, "bad", configs=configs)


@pytest.mark.parametrize("scales, message", [((0.5,), ">= 1"), ((float("nan"),), ">= 1"), ((7.0, 7), "repeat"), ((), "empty")])
def test_bad_cfg_scales_are_refused(workspace, scales, message):
    with pytest.raises(ValueError, match=message):
        make_settings(workspace, "bad", cfg_scales=scales)


def test_bad_inputs_raise_clear_errors(reference_run, workspace, tmp_path):
    reference_settings, _, _ = reference_run
    extractors = dict(feature_extractor=PixelProjection(), clip_scorer=RecordingScorer(), progress=False)
    with pytest.raises(FileNotFoundError, match="captions file .* does not exist"):
        generate_images(make_settings(workspace, tmp_path / "a", captions=tmp_path / "nope.json"), progress=False)
    (tmp_path / "broken.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="no 'annotations' list"):
        generate_images(make_settings(workspace, tmp_path / "a", captions=tmp_path / "broken.json"), progress=False)
    with pytest.raises(FileNotFoundError, match="reference folder .* does not exist"):
        run_evaluation(make_settings(workspace, tmp_path / "a", reference=tmp_path / "nope"), **extractors)
    with pytest.raises(ValueError, match="needs reference images"):
        run_evaluation(make_settings(workspace, tmp_path / "a", reference=None), stage="metrics", **extractors)
    with pytest.raises(FileNotFoundError, match="no images were generated"):
        run_evaluation(make_settings(workspace, tmp_path / "a"), stage="metrics", **extractors)
    with pytest.raises(ValueError, match="asked for 9 images"):
        generate_images(make_settings(workspace, tmp_path / "a", num_images=9), progress=False)
    # Images of other settings are never mixed into a run.
    with pytest.raises(ValueError, match=r"other settings \(steps: 2 on disk vs 3 now\)"):
        generate_images(make_settings(workspace, reference_settings.out, steps=3), progress=False)
    # Metrics refuse an incomplete set, naming it.
    partial = tmp_path / "partial"
    shutil.copytree(reference_settings.out, partial)
    (partial / "c" / "cfg4" / "285.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'c/cfg4': 1"):
        run_evaluation(make_settings(workspace, partial), stage="metrics", **extractors)
    with pytest.raises(FileNotFoundError, match="model folder"):
        generate_images(make_settings(workspace, tmp_path / "b", model=str(tmp_path / "no-model")), progress=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        make_settings(workspace, "bad", height=30)
    with pytest.raises(ValueError, match="unknown stage"):
        run_evaluation(make_settings(workspace, "bad"), stage="everything", **extractors)
    assert parse_config("tomesd:0.50").name == "tomesd:0.5" and parse_config("tomesd:0.50").dirname == "tomesd-0.5"
    assert parse_config("tomesd@4.10").name == "tomesd@4.1" and parse_config("tomesd@c").dirname == "tomesd-at-c"
    with pytest.raises(ValueError, match="torch-fidelity backend has none"):
        make_settings(workspace, "bad", fid_backend="torch-fidelity", fid_mode="legacy_tensorflow")
    with pytest.raises(ValueError, match="unknown FID backend"):
        make_settings(workspace, "bad", fid_backend="pytorch-fid")


# --- ToMe at matched FLOPs -----------------------------------------------------------------------

def test_tome_at_matched_flops(workspace, monkeypatch):
    """tomesd@c: ToMe merging in every block, at the ratio whose counted TFLOPs are closest to preset c's."""
    import tomesd

    applied = []
    real_apply = tomesd.apply_patch

    def recording_apply(model, **kwargs):
        if not isinstance(model, torch.nn.Module):  # the pipeline, not the FLOPs counter's meta UNet
            applied.append(kwargs)
        return real_apply(model, **kwargs)

    monkeypatch.setattr(tomesd, "apply_patch", recording_apply)
    settings = make_settings(workspace, "matched", configs=("tomesd@c",), cfg_scales=(7.0,), num_images=3)
    results = run_evaluation(settings, feature_extractor=PixelProjection(), clip_scorer=RecordingScorer(), progress=False)
    [matched] = results["results"]
    ratio = matched["tome_ratio"]
    assert matched["family"] == "ToMe (matched FLOPs)" and 0 < ratio <= 0.75 and matched["flops_counted"]
    # Preset c's UNet TFLOPs at this model, size and steps, counted by the AT-EDM counter.
    unet_config, vae_factor = tflops.model_configs(settings.model)
    size = settings.height * 8 // vae_factor
    target = atedm.flops_per_step(unet_config, "c", size, size, settings.steps).unet_tflops
    assert abs(matched["tflops_per_step"] - target) < 0.01 * target
    # The closest whole-token step: the ratios one latent token either side count no closer to the target.
    key, config = json.dumps(unet_config, sort_keys=True, default=str), parse_config("tomesd@c")
    for neighbour in (ratio - 1 / (size // 8) ** 2, ratio + 1 / (size // 8) ** 2):
        if 0 < neighbour <= 0.75:
            count = tflops.counted_tflops(key, replace(config, tome_ratio=neighbour), size, size, settings.steps)["tflops_per_step"]
            assert abs(count - target) >= abs(matched["tflops_per_step"] - target)
    # The pipeline got exactly that patch, and each image says so.
    assert applied == [{"ratio": ratio, "max_downsample": 4, "merge_crossattn": True, "merge_mlp": True}]
    folder = settings.out / "tomesd-at-c" / "cfg7"
    assert image_files(folder) == ["139.png", "285.png", "632.png"]
    with Image.open(folder / "285.png") as image:
        assert json.loads(image.info["tome"])["ratio"] == ratio and image.info["config"] == "tomesd@c"
    with open(settings.out / "metrics.csv") as handle:
        assert [float(row["tome_ratio"]) for row in csv.DictReader(handle)] == [ratio]
    # A budget out of ToMe's reach fails before the model loads or anything is written.
    for target_text, message in (("0.00001", "below ToMe's reach"), ("1", "above the unpatched model's")):
        out = workspace / f"unreachable{target_text}"
        with pytest.raises(ValueError, match=message):
            generate_images(make_settings(workspace, out, configs=(f"tomesd@{target_text}",)), progress=False)
        assert not out.exists()


# --- the default metric backends, up to their downloads ------------------------------------------

class _StandIn(type):
    """Any torchvision name: attribute access and calls give more stand-ins (never used before a download)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(name, (), {})

    def __call__(cls, *args, **kwargs):
        return _StandIn(cls.__name__, (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _StandIn(name, (), {})
        setattr(self, name, value)
        return value


class _TorchvisionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``torchvision`` and its submodules as stand-ins, or (``error``) fails them as a broken build does."""

    def __init__(self, error=None):
        self.error = error

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__, module.__version__ = [], "0.0.0"
        return module

    def exec_module(self, module):
        if self.error is not None:
            raise self.error


def _torchvision_imports():
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture
def clean_modules():
    """sys.modules and the import hooks as they were: a stand-in torchvision, or the libraries imported on top
    of it, must not leak into other tests, and modules a test dropped come back (not imported twice)."""
    saved = dict(sys.modules)
    finders = list(sys.meta_path)
    yield
    sys.meta_path[:] = finders
    for name in set(sys.modules) - set(saved):
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def metric_libraries(clean_modules):
    """The real clean-fid / open_clip / torch-fidelity, importable (a missing package fails the test: the
    README's test command installs them from tests/metric-libraries.txt)."""
    missing = [package for module, package in (("cleanfid", "clean-fid"), ("open_clip", "open_clip_torch"))
               if importlib.util.find_spec(module) is None]
    if missing:
        pytest.fail(f"not installed: {missing} (pip install --no-deps -r tests/metric-libraries.txt)")
    if not _torchvision_imports():
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionFinder())


@pytest.fixture
def silent_server():
    """A local HTTP server that accepts and then never answers (``stall``) or sends part of a body and stalls."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.05)
    partial = {"bytes": 0}
    connections, stop = [], [False]

    def serve():
        while not stop[0]:
            try:
                connection, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            connections.append(connection)
            if partial["bytes"]:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000000\r\n\r\n" + os.urandom(partial["bytes"]))

    import threading

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", partial
    stop[0] = True
    thread.join(timeout=5)
    for connection in connections:
        connection.close()
    server.close()


@pytest.mark.parametrize("partial_bytes", [0, 300_000])
def test_clean_fid_weights_download_times_out_and_leaves_no_file(metric_libraries, silent_server, tmp_path, monkeypatch,
                                                                 partial_bytes):
    url, partial = silent_server
    partial["bytes"] = partial_bytes  # 0: no answer at all; else part of the file, then silence
    monkeypatch.setattr(backends, "CLEANFID_INCEPTION_URL", f"{url}/inception-2015-12-05.pt")
    monkeypatch.setattr(backends, "cleanfid_cache_folder", lambda: tmp_path)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not download clean-fid's Inception weights .*timed out.*--fid-weights"):
        backends.CleanFIDInception("cpu", "clean", download_timeout_s=0.3)
    assert time.monotonic() - start < 10
    assert os.listdir(tmp_path) == []  # no truncated weights file, no temp file


def test_clean_fid_backend_loads_through_clean_fid(metric_libraries, tmp_path, monkeypatch):
    # A truncated weights file reaches clean-fid's loader (InceptionV3W, torch.jit.load) and is reported.
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(os.urandom(1000))
    with pytest.raises(RuntimeError, match=r"could not load clean-fid's Inception weights .*truncated download"):
        backends.CleanFIDInception("cpu", "clean", weights=weights)
    with pytest.raises(ValueError, match="by file name"):
        backends.CleanFIDInception("cpu", "clean", weights=shutil.copy(weights, tmp_path / "inception.pt"))
    # The call feeds the network what clean-fid's ResizeDataset feeds it, image order kept across sizes.
    from cleanfid.resize import build_resizer

    seen = []
    extractor = object.__new__(backends.CleanFIDInception)
    extractor.device = torch.device("cpu")
    extractor.model = lambda batch: (seen.append(batch), batch.flatten(1)[:, :5] + 0.0)[1]
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((20, 30, 3), (24, 16, 3), (20, 30, 3))]
    for mode in ("clean", "legacy_tensorflow"):
        seen.clear()
        extractor.resize = build_resizer(mode)
        rows = extractor(images)
        expected = [torch.from_numpy(np.asarray(build_resizer(mode)(np.asarray(image))).transpose(2, 0, 1).astype(np.float32))
                    for image in images]
        assert rows.shape == (3, 5)
        for row, tensor in zip(rows, expected):
            assert np.allclose(row, tensor.flatten()[:5].double().numpy(), atol=1e-4)
        assert len(seen) == (1 if mode == "clean" else 2) and all(batch.dtype == torch.float32 for batch in seen)


def test_torch_fidelity_backend(metric_libraries, silent_server, tmp_path, monkeypatch):
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.fail("torch-fidelity is not installed (pip install --no-deps -r tests/metric-libraries.txt)")
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    url, _ = silent_server
    monkeypatch.setattr(inception, "URL_INCEPTION_V3", f"{url}/weights-inception.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not get torch-fidelity's Inception weights .*timed out.*--fid-weights"):
        backends.TorchFidelityInception("cpu", download_timeout_s=0.3)
    assert time.monotonic() - start < 10
    # With random weights (loading skipped): pool3 features of any-size images, order kept across sizes.
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"unused")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: {})
    extractor = backends.TorchFidelityInception("cpu", weights=weights)
    for module in extractor.model.modules():  # variance-keeping random weights: features that depend on the input
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    # Dark, mid and bright noise: features far apart even through random weights.
    images = [Image.fromarray(rng.integers(low, low + 60, shape, dtype=np.uint8))
              for low, shape in ((0, (40, 48, 3)), (100, (64, 64, 3)), (195, (40, 48, 3)))]
    together = extractor(images)
    apart = np.concatenate([extractor([image]) for image in images])  # one image per call: no grouping at all
    assert together.shape == (3, 2048) and np.isfinite(together).all()
    assert np.allclose(together, apart, rtol=1e-4, atol=1e-5)
    assert min(np.abs(together[i] - together[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-2


def test_open_clip_backend_default_model_fails_offline_at_the_download(metric_libraries, monkeypatch):
    import open_clip

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("no network (test)")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", offline)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", offline)
    # The default model and tag are known to open_clip: the only failure is the download of their weights.
    with pytest.raises(RuntimeError, match=r"could not build open_clip ViT-g-14 .*no network \(test\).*--clip-pretrained"):
        backends.OpenCLIPScore("cpu")
    assert calls == [("laion/CLIP-ViT-g-14-laion2B-s34B-b88K",)]
    with pytest.raises(ValueError, match=r"no pretrained tag 'laion2b_typo' for ViT-g-14 \(known: .*laion2b_s34b_b88k"):
        backends.OpenCLIPScore("cpu", pretrained="laion2b_typo")
    with pytest.raises(ValueError, match="open_clip has no model 'ViT-q-14'"):
        backends.OpenCLIPScore("cpu", model="ViT-q-14")
    assert len(calls) == 1


def test_default_metrics_fail_offline_before_generation(metric_libraries, silent_server, workspace, tmp_path, monkeypatch):
    import open_clip

    url, _ = silent_server
    monkeypatch.setattr(backends, "CLEANFID_INCEPTION_URL", f"{url}/inception-2015-12-05.pt")
    monkeypatch.setattr(backends, "cleanfid_cache_folder", lambda: tmp_path / "cache")
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf",
                        lambda *args, **kwargs: (_ for _ in ()).throw(OSError("no network (test)")))
    settings = make_settings(workspace, tmp_path / "out", download_timeout_s=0.3)
    with pytest.raises(RuntimeError, match="could not download clean-fid's Inception weights"):
        run_evaluation(settings, progress=False)
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(b"a local copy")  # the check does not load it; the CLIP weights are next
    with pytest.raises(RuntimeError, match=r"could not download open_clip ViT-g-14 laion2b_s34b_b88k .*no network"):
        run_evaluation(replace(settings, fid_weights=weights), progress=False)
    assert not (tmp_path / "out").exists()  # nothing generated


def test_broken_torchvision_is_reported_before_generation(clean_modules, workspace, tmp_path):
    if importlib.util.find_spec("cleanfid") is None:
        pytest.fail("clean-fid is not installed (pip install --no-deps -r tests/metric-libraries.txt)")
    for name in [name for name in sys.modules if name.split(".")[0] in ("torchvision", "cleanfid")]:
        del sys.modules[name]
    # What a CUDA torchvision wheel beside a CPU torch does on import.
    sys.meta_path.insert(0, _TorchvisionFinder(RuntimeError("operator torchvision::nms does not exist")))
    with pytest.raises(ImportError, match=r"clean-fid, which is installed but fails to import .*torchvision::nms.*torchvision matches torch"):
        run_evaluation(make_settings(workspace, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_frechet_distance_matches_clean_fid(metric_libraries):
    from cleanfid.fid import frechet_distance as clean_fid_distance

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((30, 6)) * rng.uniform(0.5, 2, 6) + rng.standard_normal(6)
    ours = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert ours == pytest.approx(float(clean_fid_distance(*gaussian_stats(a), *gaussian_stats(b))), rel=1e-9)


def test_command_line_metric_options():
    args = build_parser().parse_args(["--model", "m", "--captions", "c.json", "--out", "o", "--fid-backend", "torch-fidelity",
                                      "--fid-weights", "w.pth", "--clip-model", "ViT-B-32", "--clip-pretrained", "ckpt.bin",
                                      "--download-timeout", "5", "--configs", "full,tomesd@c,tomesd@4.1"])
    settings = settings_from_args(args)
    assert (settings.fid_backend, settings.fid_weights.name, settings.clip_model, settings.clip_pretrained,
            settings.download_timeout_s) == ("torch-fidelity", "w.pth", "ViT-B-32", "ckpt.bin", 5.0)
    assert settings.configs == ("full", "tomesd@c", "tomesd@4.1")
