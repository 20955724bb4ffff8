"""The settings of the frontier, by name, and how each goes on and comes off a diffusers UNet.

A setting's name says all of it, so that the speed CSV (SDXL-base) and the fidelity CSVs (the trained
small models) join on it:

* ``full``: the unmodified UNet, the reference of every speed-up and every fidelity score;
* ``atedm-<preset>-<recovery>-<similarity>-<ranking>``: AT-EDM preset a, b, c, d or dagger with recovery
  ``copy`` (the paper's) or ``delta``, similarity ``attention`` (the paper's) or ``key_cosine``, and
  ranking ``gwpr`` (the paper's) or ``random``. ``atedm-c-copy-attention-gwpr`` is preset c as
  published;
* ``tomesd-<ratio>``: ToMe for SD (tomesd) merging before self-attention, cross-attention and the MLP at
  the highest-resolution attention level (``max_downsample=2``, as SDXL users set it); its FLOPs bottom
  out near 88% of full SDXL at ratio 0.75, so the ratios stop there;
* ``deepcache-<interval>``: DeepCache (the DeepCache package's helper, ``cache_branch_id=0``): a full
  UNet pass every ``interval`` steps, in between only the shallowest branch on cached deep features;
* ``atedm-c+deepcache-3``: preset c as published inside DeepCache's full passes;
* ``todo-<factor>``: ToDo (``benchmarks/todo.py``), the keys and values of the highest-resolution
  level's self-attention downsampled ``factor`` x ``factor`` (nearest).

``apply_setting(unet, setting, scheduler)`` installs a setting and returns the function that removes
it. DeepCache reads the step index from ``scheduler.timesteps``, so ``scheduler`` must hold the
schedule the UNet is about to be called with (``set_timesteps`` done).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import atedm

PRESETS = ("a", "b", "c", "d", "dagger")
RECOVERIES = ("copy", "delta")
SIMILARITIES = ("attention", "key_cosine")
RANKINGS = ("gwpr", "random")
TOMESD_RATIOS = (0.25, 0.5, 0.75)
DEEPCACHE_INTERVALS = (2, 3, 5)
TODO_FACTORS = (2, 4)
PUBLISHED = ("copy", "attention", "gwpr")  # AT-EDM as the paper describes it


@dataclass(frozen=True)
class Setting:
    name: str
    family: str  # full | atedm | tomesd | deepcache | atedm+deepcache | todo
    atedm_preset: str | None = None
    recovery: str = "copy"
    similarity: str = "attention"
    ranking: str = "gwpr"
    tome_ratio: float | None = None
    deepcache_interval: int | None = None
    todo_factor: int | None = None

    @property
    def across_steps(self) -> bool:
        """True where the method works across denoising steps, so only a whole generation can time it."""
        return self.deepcache_interval is not None

    @property
    def published(self) -> bool:
        """An AT-EDM setting exactly as the paper describes it (any preset)."""
        return self.atedm_preset is not None and (self.recovery, self.similarity, self.ranking) == PUBLISHED

    def atedm_config(self, backend: str = "auto") -> atedm.ATEDMConfig | None:
        if self.atedm_preset is None:
            return None
        return atedm.get_preset(self.atedm_preset).replace(
            recovery=self.recovery, similarity=self.similarity, ranking=self.ranking, backend=backend)


def atedm_setting_name(preset: str, recovery: str, similarity: str, ranking: str) -> str:
    return f"atedm-{preset}-{recovery}-{similarity}-{ranking}"


def all_settings() -> list[Setting]:
    """Every setting of the frontier, ``full`` first."""
    settings = [Setting("full", "full")]
    for preset in PRESETS:
        for recovery in RECOVERIES:
            for similarity in SIMILARITIES:
                for ranking in RANKINGS:
                    settings.append(Setting(atedm_setting_name(preset, recovery, similarity, ranking), "atedm",
                                            preset, recovery, similarity, ranking))
    settings += [Setting(f"tomesd-{ratio}", "tomesd", tome_ratio=ratio) for ratio in TOMESD_RATIOS]
    settings += [Setting(f"deepcache-{interval}", "deepcache", deepcache_interval=interval)
                 for interval in DEEPCACHE_INTERVALS]
    settings.append(Setting("atedm-c+deepcache-3", "atedm+deepcache", "c", *PUBLISHED, deepcache_interval=3))
    settings += [Setting(f"todo-{factor}", "todo", todo_factor=factor) for factor in TODO_FACTORS]
    return settings


SETTINGS = {setting.name: setting for setting in all_settings()}


def select(names: str | None) -> list[Setting]:
    """Settings from a comma-separated list of names or families (None or "all": every one), in the
    frontier's order; an unknown name raises a ValueError listing the families."""
    if names in (None, "", "all"):
        return all_settings()
    wanted = [part.strip() for part in names.split(",") if part.strip()]
    families = {setting.family for setting in SETTINGS.values()}
    for name in wanted:
        if name not in SETTINGS and name not in families:
            raise ValueError(f"unknown frontier setting {name!r}: a name such as atedm-c-copy-attention-gwpr, "
                             f"tomesd-0.5, deepcache-3, todo-2, or a family: {sorted(families)}")
    return [setting for setting in all_settings() if setting.name in wanted or setting.family in wanted]


def apply_setting(unet, setting: Setting, scheduler=None, backend: str = "auto") -> Callable[[], None]:
    """Install ``setting`` on ``unet``; returns the function that takes it off again. ``scheduler``
    (needed by DeepCache settings) is the scheduler whose ``timesteps`` the UNet will be called with."""
    undo: list[Callable[[], None]] = []

    def remove() -> None:
        while undo:
            undo.pop()()

    try:
        config = setting.atedm_config(backend)
        if config is not None:
            atedm.apply(unet, config)
            undo.append(lambda: atedm.remove(unet))
        if setting.tome_ratio is not None:
            import tomesd

            from benchmarks.fidelity.bench_fidelity import tomesd_kwargs

            tomesd.apply_patch(unet, **tomesd_kwargs(setting.tome_ratio, max_downsample=2))
            undo.append(lambda: tomesd.remove_patch(unet))
        if setting.todo_factor is not None:
            from benchmarks.todo import apply_todo, remove_todo

            apply_todo(unet, setting.todo_factor)
            undo.append(lambda: remove_todo(unet))
        if setting.deepcache_interval is not None:
            if scheduler is None:
                raise ValueError(f"{setting.name} needs the scheduler whose timesteps the UNet is called with")
            from DeepCache import DeepCacheSDHelper

            # The helper only reads pipe.unet and pipe.scheduler.timesteps (to index the step).
            helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
            helper.set_params(cache_interval=setting.deepcache_interval, cache_branch_id=0)
            had_forward = {module for module in unet.modules() if "forward" in module.__dict__}
            helper.enable()

            def disable_deepcache() -> None:
                helper.disable()
                # disable() puts the original bound methods back as instance attributes; a bound method
                # held by the instance would survive a deepcopy pointing at the old module, so drop them.
                for module in unet.modules():
                    if module not in had_forward:
                        module.__dict__.pop("forward", None)

            undo.append(disable_deepcache)
    except Exception:
        remove()
        raise
    return remove
