"""The generation stage: every (config, CFG scale, caption) image on disk, sharded, resumable, atomic.

* Sharding: the rank and world size come from the variables ``torchrun`` and ``accelerate launch`` set
  (``RANK`` / ``WORLD_SIZE``, or ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` alone); each rank generates its
  own batches (``prompts.shard_batches``), on ``cuda:<LOCAL_RANK>``.
* Resumable: an image whose file exists is not generated again. A batch is skipped when all its files
  exist; a batch with some missing is generated whole (the same batch as the first time, so the same
  pixels) and only the missing files are written.
* Atomic: each PNG is written to a hidden temp file in its own folder, fsynced, then renamed over the
  final name with ``os.replace``: a reader, a resumed run or the metrics stage sees either no file or a
  whole one. Temp files left by a killed run are removed by the next run of the rank that owns them.
* Deterministic: image i starts from a CPU generator seeded with ``image_seed(seed, image_id)`` (ToMe's
  random merge choices are seeded from it too); matched ToMe ratios are solved on the FLOPs counter, a
  pure function of the model's config, size and steps, so every rank and rerun applies the same ratio.
* ``<out>/generation.json`` records what every image depends on (model, captions, seed, steps, size,
  dtype, batch size); a rerun with other values into the same folder is refused rather than mixing
  images of two settings. Configs, CFG scales and ``num_images`` may change between runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, PngImagePlugin

from .prompts import Prompt, image_seed, load_coco_captions, prompts_digest, select_prompts, shard_batches
from .settings import EvalSettings, MethodConfig, cfg_dirname
from .tflops import resolve_configs

MANIFEST = "generation.json"
TEMP_SUFFIX = ".tmp"
PROGRESS_EVERY_S = 60.0  # a 5000-image set takes hours on one GPU: a line a minute, not a line a batch


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None


def rank_from_env(env: dict | None = None) -> RankInfo:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job; (0, 1) when run alone."""
    env = os.environ if env is None else env

    def read(name: str) -> int | None:
        if name not in env or env[name] == "":
            return None
        try:
            return int(env[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None

    local_rank = read("LOCAL_RANK")
    rank, world_size = read("RANK"), read("WORLD_SIZE")
    if rank is None:
        # A launcher that sets only the local variables: one machine, ranks numbered locally.
        rank, world_size = local_rank, read("LOCAL_WORLD_SIZE") or world_size
    if rank is None:
        return RankInfo()
    if world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent rank variables: rank {rank}, world size {world_size} (RANK/WORLD_SIZE or LOCAL_RANK/LOCAL_WORLD_SIZE)")
    return RankInfo(rank, world_size, local_rank)


def rank_device(device: str, info: RankInfo) -> str:
    """``cuda`` means this rank's GPU under a launcher: ``cuda:<LOCAL_RANK>``."""
    if device == "cuda" and info.local_rank is not None:
        device = f"cuda:{info.local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; pass --device cpu to run on the CPU")
    return device


def check_model_folder(model: str) -> None:
    """A model that is spelled as a path must exist (anything else may be a hub id)."""
    if not Path(model).exists() and model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model folder {model} does not exist")


def load_pipeline(settings: EvalSettings, device: str):
    """The text-to-image pipeline of ``settings.model`` on ``device``, progress bar off."""
    from diffusers import AutoPipelineForText2Image

    check_model_folder(settings.model)
    pipe = AutoPipelineForText2Image.from_pretrained(settings.model, torch_dtype=settings.torch_dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_prompts(settings: EvalSettings) -> tuple[list[Prompt], str]:
    """The run's prompts and the digest of the whole caption selection (for the manifest)."""
    everything = load_coco_captions(settings.captions)
    return select_prompts(everything, settings.num_images), prompts_digest(everything)


def manifest_for(settings: EvalSettings, digest: str) -> dict:
    return {
        "model": settings.model,
        "captions_digest": digest,
        "seed": settings.seed,
        "steps": settings.steps,
        "height": settings.height,
        "width": settings.width,
        "dtype": str(settings.torch_dtype).removeprefix("torch."),
        "batch_size": settings.batch_size,
    }


def check_manifest(settings: EvalSettings, digest: str, required: bool) -> bool:
    """Refuse to mix runs: a manifest in the folder must match these settings. Returns whether one exists."""
    path = settings.out / MANIFEST
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} is missing: no images were generated into {settings.out} yet (run --stage generate first)")
        return False
    found = json.loads(path.read_text())
    expected = manifest_for(settings, digest)
    differing = {key: (found.get(key), value) for key, value in expected.items() if found.get(key) != value}
    if differing:
        detail = ", ".join(f"{key}: {old!r} on disk vs {new!r} now" for key, (old, new) in differing.items())
        raise ValueError(f"{settings.out} holds images of other settings ({detail}); use another --out or the same settings")
    return True


def write_bytes_atomically(path: Path, data: bytes) -> None:
    _write_atomically(path, lambda handle: handle.write(data))


def write_png_atomically(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """Save ``image`` as PNG at ``path`` so that ``path`` is never seen half-written."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    _write_atomically(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))


def _write_atomically(path: Path, write: Callable) -> None:
    # The temp file lives in the target's folder: os.replace is atomic only within one filesystem.
    # Its name starts with '.<target name>.' so that the owning rank can find it after a crash.
    temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: Path, names: set[str]) -> int:
    """Delete temp files a killed run left for the given final names; other ranks' files are untouched."""
    removed = 0
    for entry in os.scandir(folder):
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
            target = entry.name[1:].rsplit(".", 2)[0]  # ".<name>.<pid-uuid>.tmp" -> "<name>"
            if target in names:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def image_path(settings: EvalSettings, config: MethodConfig, scale: float, prompt: Prompt) -> Path:
    return settings.image_folder(config, scale) / f"{prompt.image_id}.png"


@dataclass
class GenerationSummary:
    written: int = 0
    already_there: int = 0


def generate_images(
    settings: EvalSettings,
    pipe=None,
    ranks: RankInfo | None = None,
    on_image_saved: Callable[[Path], None] | None = None,
    progress: bool = True,
) -> GenerationSummary:
    """Generate this rank's share of every (config, CFG scale) image that is not on disk yet.

    ``pipe`` defaults to loading ``settings.model``; ``ranks`` to the launcher's environment;
    ``on_image_saved(path)`` is called after each image lands (tests interrupt a run with it).
    """
    ranks = rank_from_env() if ranks is None else ranks
    prompts, digest = load_prompts(settings)
    has_manifest = check_manifest(settings, digest, required=False)
    batches = shard_batches(prompts, ranks.rank, ranks.world_size, settings.batch_size)
    mine = {f"{prompt.image_id}.png" for batch in batches for prompt in batch}
    configs = resolve_configs(settings)  # before the model loads: an unreachable FLOPs budget fails fast
    if pipe is None:
        pipe = load_pipeline(settings, rank_device(settings.device, ranks))
    settings.out.mkdir(parents=True, exist_ok=True)
    if not has_manifest:  # written once the model loaded: a mistyped --model leaves no manifest behind
        write_bytes_atomically(settings.out / MANIFEST, (json.dumps(manifest_for(settings, digest), indent=2) + "\n").encode())
    summary = GenerationSummary()
    tag = f"[rank {ranks.rank}/{ranks.world_size}]"
    for config in configs:
        config.apply(pipe, settings.backend)
        try:
            for scale in settings.cfg_scales:
                folder = settings.image_folder(config, scale)
                folder.mkdir(parents=True, exist_ok=True)
                remove_stale_temp_files(folder, mine)
                written_before, last_report = summary.written, time.monotonic()
                for done, batch in enumerate(batches, start=1):
                    if progress and time.monotonic() - last_report > PROGRESS_EVERY_S:
                        last_report = time.monotonic()
                        print(f"{tag} {config.name} cfg {scale:g}: batch {done} of {len(batches)}", file=sys.stderr)
                    paths = [image_path(settings, config, scale, prompt) for prompt in batch]
                    missing = [not path.exists() for path in paths]
                    summary.already_there += len(batch) - sum(missing)
                    if not any(missing):
                        continue
                    images = _render(pipe, settings, config, scale, batch)
                    for prompt, path, image, needed in zip(batch, paths, images, missing):
                        if not needed:
                            continue
                        write_png_atomically(image, path, _provenance(settings, config, scale, prompt))
                        summary.written += 1
                        if on_image_saved is not None:
                            on_image_saved(path)
                if progress:
                    count = sum(len(batch) for batch in batches)
                    print(f"{tag} {config.name} cfg {scale:g}: {summary.written - written_before} generated, "
                          f"{count} of {len(prompts)} images are this rank's", file=sys.stderr)
        finally:
            config.remove(pipe)
    return summary


def _render(pipe, settings: EvalSettings, config: MethodConfig, scale: float, batch: list[Prompt]) -> list[Image.Image]:
    seeds = [image_seed(settings.seed, prompt.image_id) for prompt in batch]
    # CPU generators: the starting noise is then the same on every device and GPU model.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    config.before_generation(pipe, seeds[0])
    with torch.inference_mode():
        result = pipe(
            prompt=[prompt.caption for prompt in batch],
            num_inference_steps=settings.steps,
            guidance_scale=scale,
            height=settings.height,
            width=settings.width,
            generator=generators,
            output_type="pil",
        )
    return result.images


def _provenance(settings: EvalSettings, config: MethodConfig, scale: float, prompt: Prompt) -> dict[str, str]:
    """PNG text chunks: an image file says on its own what produced it."""
    text = {
        "image_id": str(prompt.image_id),
        "caption": prompt.caption,
        "config": config.name,
        "cfg_scale": f"{scale:g}",
        "seed": str(image_seed(settings.seed, prompt.image_id)),
        "steps": str(settings.steps),
        "model": settings.model,
    }
    if config.kind == "tomesd":
        text["tome"] = json.dumps(config.tome_kwargs(), sort_keys=True)
    return text


def missing_images(settings: EvalSettings, prompts: list[Prompt]) -> dict[str, int]:
    """Per '<config>/cfg<scale>', how many of the run's images are not on disk (sets with none missing omitted)."""
    missing = {}
    for config in settings.method_configs:
        for scale in settings.cfg_scales:
            count = sum(not image_path(settings, config, scale, prompt).exists() for prompt in prompts)
            if count:
                missing[f"{config.dirname}/{cfg_dirname(scale)}"] = count
    return missing


def wait_for_images(settings: EvalSettings, prompts: list[Prompt], max_poll_s: float = 30.0) -> None:
    """Block until every image exists (the other ranks' too), or raise after ``settings.wait_timeout_s``.

    The folder is scanned again after 0.5 s, then at doubling intervals up to ``max_poll_s``: ranks
    usually finish within a batch of each other, and a long wait should not stat every file each second.
    """
    deadline = time.monotonic() + settings.wait_timeout_s
    poll_s = 0.5
    while missing := missing_images(settings, prompts):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"after {settings.wait_timeout_s:g} s still missing {missing}; when the other "
                               "ranks are done, run the same command with --stage metrics")
        print(f"[rank 0] waiting for {sum(missing.values())} images of the other ranks ...", file=sys.stderr)
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        poll_s = min(2 * poll_s, max_poll_s)
