"""The COCO evaluation harness (atedm.evaluation) end to end on a tiny SDXL pipeline saved to disk.

32 x 32 images, 2 steps, 5 of 6 captions from a captions file written here, reference images written
here; FID features and CLIP scores injected (the real ones need torchvision and downloads).
"""

import csv
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import atedm
from atedm.evaluation import EvalSettings, RankInfo, frechet_distance, gaussian_stats, generate_images, run_evaluation
from atedm.evaluation.cli import main
from atedm.evaluation.generate import rank_from_env, write_png_atomically
from atedm.evaluation.prompts import image_seed, load_coco_captions, select_prompts, shard_batches
from atedm.evaluation.settings import parse_config
from tests.tiny_models import tiny_sdxl_pipeline

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
