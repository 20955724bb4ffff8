"""The prompt list: one COCO caption per image, a seed per image, and the split of the work over ranks.

Everything here is a pure function of its inputs, so every rank, every rerun and the metrics stage derive
the same list without talking to each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    """One evaluation item: a COCO image id and the caption chosen for it."""

    image_id: int
    caption: str


def load_coco_captions(path: str | Path) -> list[Prompt]:
    """Every captioned image of a COCO ``captions_*.json``, sorted by image id, with one caption each.

    The caption kept for an image is the one with the lowest annotation id (the first in file order
    when annotations carry no id), stripped of surrounding whitespace: COCO captions often end in a
    space or a newline, which would otherwise reach the text encoders. When the file lists ``images``,
    only those ids count (a caption of an unlisted image is an error in the file, not a prompt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist (expected COCO's captions_val2017.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"captions file {path} is not valid JSON: {error}") from error
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"captions file {path} has no 'annotations' list; expected COCO's captions format")
    listed = None
    if isinstance(data.get("images"), list):
        listed = {int(image["id"]) for image in data["images"] if isinstance(image, dict) and "id" in image}

    best: dict[int, tuple[tuple[int, int], str]] = {}
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "image_id" not in annotation or not isinstance(annotation.get("caption"), str):
            raise ValueError(f"captions file {path}: annotation #{position} lacks an 'image_id' or a 'caption' string")
        image_id = int(annotation["image_id"])
        if listed is not None and image_id not in listed:
            raise ValueError(f"captions file {path}: annotation #{position} refers to image {image_id}, which 'images' does not list")
        caption = annotation["caption"].strip()
        if not caption:
            continue
        rank = (int(annotation.get("id", position)), position)
        if image_id not in best or rank < best[image_id][0]:
            best[image_id] = (rank, caption)
    if not best:
        raise ValueError(f"captions file {path} holds no non-empty caption")
    return [Prompt(image_id, best[image_id][1]) for image_id in sorted(best)]


def select_prompts(prompts: list[Prompt], num_images: int) -> list[Prompt]:
    """The first ``num_images`` prompts by image id (COCO ids are not ordered by content).

    Taking a prefix keeps a smaller run a subset of a larger one, so a run can later be extended.
    """
    if num_images > len(prompts):
        raise ValueError(f"asked for {num_images} images but the captions file has {len(prompts)} captioned images")
    return prompts[:num_images]


def prompts_digest(prompts: list[Prompt]) -> str:
    """A short fingerprint of a prompt list, to notice a different captions file in a resumed run."""
    text = json.dumps([[p.image_id, p.caption] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def image_seed(base_seed: int, image_id: int) -> int:
    """The generator seed of one image: a hash of (base seed, image id), in [0, 2**63).

    A hash rather than base + id keeps runs with nearby base seeds from sharing images. The seed does
    not depend on the config or the CFG scale: every config starts a caption from the same noise, so
    config-to-config differences come from the method alone.
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{int(image_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard_batches(items: list, rank: int, world_size: int, batch_size: int) -> list[list]:
    """This rank's batches: the items cut into consecutive batches, batch b going to rank b mod W.

    With ``batch_size`` 1 rank r takes items r, r + W, r + 2W, ... Batches are cut from the whole list
    before they are dealt out, so an image is always generated in the same batch, whatever the number
    of ranks and however often the run was resumed (batch composition can change the last bits of a
    GPU result).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank {rank}, world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    return batches[rank::world_size]
