"""Counted FLOPs of one UNet pass, full or with AT-EDM, on the real architecture without weights.

The UNet is built on the ``meta`` device (no memory, no weights) and run once per DSAP phase under
``torch.utils.flop_counter.FlopCounterMode``; FLOPs are 2 x multiply-adds of matmuls, convolutions and
attention, per image (batch 1). AT-EDM's own work (rebuilding the map, G-WPR, top-k, gather, recovery)
is counted by a second counter nested around it, and reported apart from the UNet's own FLOPs: the
paper's budgets count the UNet only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from .config import ATEDMConfig
from .patch import apply, get_state, remove
from .presets import resolve_config


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs per image per UNet pass, averaged over the schedule (TFLOPs = 1e12 FLOPs)."""

    unet_tflops: float  # the UNet's own work: what the paper's budgets count
    overhead_tflops: float  # AT-EDM's scoring and recovery work on top
    full_tflops: float  # the unpatched UNet at the same size
    early_unet_tflops: float
    late_unet_tflops: float
    early_steps: int
    num_inference_steps: int

    @property
    def total_tflops(self) -> float:
        return self.unet_tflops + self.overhead_tflops

    @property
    def ideal_speedup(self) -> float:
        """The speed-up FLOPs alone would give: full / pruned UNet FLOPs."""
        return self.full_tflops / self.unet_tflops


def _unet_config(unet_or_config) -> dict:
    if isinstance(unet_or_config, UNet2DConditionModel):
        return dict(unet_or_config.config)
    if isinstance(unet_or_config, dict):
        return dict(unet_or_config)
    raise TypeError(f"expected a UNet2DConditionModel or its config dict; got {type(unet_or_config).__name__}")


def build_meta_unet(unet_config: dict) -> UNet2DConditionModel:
    """The UNet architecture on the meta device: shapes only, built in well under a second."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config)


def text_time_sizes(unet_config: dict) -> tuple[int, int]:
    """(width of the pooled text embedding, number of time ids) of a ``text_time`` UNet.

    SDXL-base and its fine-tunes take 6 time ids (original size, crop offset, target size) beside the
    pooled embedding of the second text encoder. The refiner conditions on that one encoder alone, so
    its pooled embedding is as wide as its cross-attention input, and takes 5 ids (the aesthetic score
    replaces the target size): the projection input is then cross_attention_dim + 5 x time_embed_dim.
    """
    projection = unet_config["projection_class_embeddings_input_dim"]
    per_id = unet_config["addition_time_embed_dim"]
    if projection == unet_config["cross_attention_dim"] + 5 * per_id:
        return unet_config["cross_attention_dim"], 5
    return projection - 6 * per_id, 6


def example_inputs(unet_config: dict, batch: int, height: int, width: int, device="meta", dtype=torch.float32) -> dict:
    """UNet call arguments for an SDXL-style UNet at an image size (latent = image / 8), with as many
    sample channels as the UNet takes (9 for an inpainting UNet)."""
    factory = dict(device=device, dtype=dtype)
    inputs = {
        "sample": torch.randn(batch, unet_config["in_channels"], height // 8, width // 8, **factory),
        "timestep": torch.full((batch,), 500.0, **factory),
        "encoder_hidden_states": torch.randn(batch, 77, unet_config["cross_attention_dim"], **factory),
    }
    if unet_config.get("addition_embed_type") == "text_time":
        text_dim, time_ids = text_time_sizes(unet_config)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, **factory),
            "time_ids": torch.randn(batch, time_ids, **factory),
        }
    return inputs


class _OverheadCounter:
    """Counts the FLOPs of every ``with state.overhead_scope():`` section of a pass.

    A FlopCounterMode clears its counts on each entry, so each section gets a fresh one and the totals
    are summed. Nested inside the pass's own counter, the sections are counted by both.
    """

    def __init__(self):
        self.flops = 0

    def __call__(self):
        counter = FlopCounterMode(display=False)
        owner = self

        class _Section:
            def __enter__(self):
                counter.__enter__()

            def __exit__(self, *exc):
                counter.__exit__(*exc)
                owner.flops += counter.get_total_flops()

        return _Section()


def count_pass(model: torch.nn.Module, inputs: dict, state) -> tuple[float, float]:
    """(total FLOPs, AT-EDM's own FLOPs) of one pass of ``model`` (a UNet, a ControlNet, any module) on
    ``inputs``; ``state`` is the model's ``ATEDMState`` when patched, else None."""
    overhead = _OverheadCounter()
    if state is not None:
        state.overhead_scope = overhead
    with FlopCounterMode(display=False) as total, torch.no_grad():
        model(**inputs)
    return float(total.get_total_flops()), float(overhead.flops)


def flops_per_step(
    unet_or_config,
    config: ATEDMConfig | str | None = None,
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 50,
) -> FlopsReport:
    """Average FLOPs per step for one image; ``config=None`` counts the unpatched UNet.

    With a config, the early-phase and late-phase passes are counted separately and averaged with the
    number of early steps DSAP gives ``num_inference_steps``.
    """
    return flops_per_step_by_config(unet_or_config, {"counted": config}, height, width, num_inference_steps)["counted"]


def flops_per_step_by_config(
    unet_or_config,
    configs: Mapping[str, ATEDMConfig | str | None],
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 50,
) -> dict[str, FlopsReport]:
    """``flops_per_step`` of several configs (name -> config, None = unpatched) on one UNet, by name.

    A pass's count depends only on the architecture, the image size, the AT-EDM config and the DSAP phase,
    and one pass of the full SDXL takes seconds of Python on the meta device: each distinct pass is counted
    once per process (``_COUNTED_PASSES``), and the meta UNet is built only when a pass is missing.
    """
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8 (the VAE factor); got {height} x {width}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
    unet_config = _unet_config(unet_or_config)
    architecture = (json.dumps(unet_config, sort_keys=True, default=str), height, width)
    built = {}

    def counted(config: ATEDMConfig | None) -> dict:
        key = (architecture, config)
        if key not in _COUNTED_PASSES:
            if not built:
                built["unet"] = build_meta_unet(unet_config)
                built["inputs"] = example_inputs(unet_config, 1, height, width)
            unet, inputs = built["unet"], built["inputs"]
            _COUNTED_PASSES[key] = ({"full": count_pass(unet, inputs, None)} if config is None
                                    else _phase_counts(unet, inputs, config))
        return _COUNTED_PASSES[key]

    full = counted(None)["full"][0]
    reports = {}
    for name, config in configs.items():
        if config is None:
            reports[name] = FlopsReport(full / 1e12, 0.0, full / 1e12, full / 1e12, full / 1e12, 0, num_inference_steps)
        else:
            config = resolve_config(config, backend="torch")  # counted on the meta device: PyTorch ops only
            reports[name] = _report(full, counted(config), num_inference_steps, config)
    return reports


# (architecture JSON, height, width), AT-EDM config or None -> {phase: (total FLOPs, AT-EDM's own FLOPs)}
_COUNTED_PASSES: dict[tuple, dict[str, tuple[float, float]]] = {}


def _phase_counts(unet, inputs: dict, config: ATEDMConfig) -> dict[str, tuple[float, float]]:
    """(total FLOPs, AT-EDM's own FLOPs) of one pass in each DSAP phase, ``config`` applied for the count."""
    apply(unet, config)
    state = get_state(unet)
    try:
        per_phase = {}
        for phase in ("early", "late"):
            state.dsap.set_phase(phase)
            per_phase[phase] = count_pass(unet, inputs, state)
    finally:
        remove(unet)
    return per_phase


def _report(full: float, per_phase: dict, num_inference_steps: int, config: ATEDMConfig) -> FlopsReport:
    """The schedule's average of the two phases' counts, weighted by DSAP's early steps."""
    n_early = config.early_steps(num_inference_steps) if config.dsap_fraction > 0 else 0
    n_late = num_inference_steps - n_early

    def average(index: int) -> float:
        return (n_early * per_phase["early"][index] + n_late * per_phase["late"][index]) / num_inference_steps

    return FlopsReport(
        unet_tflops=(average(0) - average(1)) / 1e12,
        overhead_tflops=average(1) / 1e12,
        full_tflops=full / 1e12,
        early_unet_tflops=(per_phase["early"][0] - per_phase["early"][1]) / 1e12,
        late_unet_tflops=(per_phase["late"][0] - per_phase["late"][1]) / 1e12,
        early_steps=n_early,
        num_inference_steps=num_inference_steps,
    )


def pruned_report(model, inputs: dict, full: float, config, num_inference_steps: int) -> FlopsReport:
    """``flops_per_step``'s report of ``config`` on an already built model (a UNet or a ControlNet, e.g. on
    the meta device) whose unpatched pass counted ``full`` FLOPs."""
    config = resolve_config(config, backend="torch")
    return _report(full, _phase_counts(model, inputs, config), num_inference_steps, config)
