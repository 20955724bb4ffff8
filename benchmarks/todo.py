"""ToDo, token downsampling (Smith, Saxena and Saha, "ToDo: Token Downsampling for Efficient Generation of
High-Resolution Images", 2024, arXiv 2402.13573): a baseline AT-EDM is compared with.

    python -m benchmarks.todo    # SDXL-base's counted TFLOPs/step at 1024 px: full, and factors 2 and 4 at the
                                 # default level and at every attention level (meta device, ~30 s)

The idea (the paper's section on the method): neighbouring latent tokens are highly redundant, so a
self-attention keeps every query but attends to keys and values taken from a spatially downsampled copy
of the token grid. For N tokens on an H x W grid, channels C, factor f and M = N / f^2 kept positions::

    X      (B, N, C)  the normed hidden states the attention receives, row-major over (H, W)
    D(X)   (B, M, C)  X downsampled on its grid: the top-left token of each f x f window ("nearest",
                      the paper's choice, a strided subsampling) or the window's mean ("avg_pool")
    out = to_out( softmax( to_q(X) to_k(D(X))^T * scale ) to_v(D(X)) )      per head

The paper writes the downsampling on the keys and values; here it runs on X before ``to_k`` / ``to_v``,
which is the same thing for both methods (a row selection or a window mean commutes with an affine map)
and projects f^2 times fewer tokens. The queries, hence the output's N tokens, are untouched: no
unmerging step, unlike ToMe. Cost per layer: 4 N M C for the two attention matmuls instead of 4 N^2 C, and
4 M C^2 for the key and value projections instead of 4 N C^2.

Where it applies: the paper (on SD 1.x/2.x) downsamples the attention of the U-Net's highest-resolution
level only, where the token count, and the quadratic cost, is largest (the authors' demo: factor 2 at
1024 px, up to 4 at 2048 px). Here that is the self-attention (``attn1``) of every transformer layer at the
highest-resolution level that has attention (SDXL: level 2, ``down_blocks.1`` and ``up_blocks.1``, 64 x 64
tokens at 1024 px; levels numbered as ``atedm.ATEDMConfig.prune_levels``, 1 = full latent). ``levels``
chooses others. Where the paper is silent, this module chooses: the grid must divide by the factor
(refused otherwise, rather than padded); cross-attention is never touched (its keys are text tokens, with
no grid).

The grid: a processor sees only (B, N, C). ``apply_todo`` puts a forward pre-hook on the UNet that records
the latent's (h, w) on each call; a level's grid is the latent halved (rounding up, as SDXL's stride-2
convolutions do) until it has N tokens, and a token count that no level's grid has is refused.

Counting: ``todo_flops`` counts one pass on the meta device exactly as ``atedm.flops`` counts the UNet
(``FlopCounterMode``, 2 x multiply-adds, one image). The downsampling itself (a slice, or N C additions)
is no matmul and is not counted.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

# atedm's level rule (1 = full latent resolution), so ``levels`` here means what prune_levels means there.
from atedm.patch import block_level

METHODS = ("nearest", "avg_pool")
_PATCH_ATTRIBUTE = "_todo_patch"


@dataclass
class ToDoState:
    """Everything one ``apply_todo`` shares between its hook and its processors."""

    latent_size: tuple[int, int] | None = None  # (h, w) of the latest UNet call's sample
    calls: int = 0  # downsampled attention passes run: the proof that the patched path ran

    def record_latent_size(self, module, args, kwargs) -> None:
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))

    def grid_of(self, num_tokens: int) -> tuple[int, int]:
        """(H, W) of the level whose grid has ``num_tokens`` tokens, from the recorded latent size."""
        if self.latent_size is None:
            raise RuntimeError(
                "ToDoAttnProcessor needs the token grid: install it with apply_todo (whose UNet hook records the "
                "latent size), or set its state.latent_size to the (H, W) of the tokens it is called on"
            )
        height, width = self.latent_size
        while height * width > num_tokens:  # rounding up: SDXL's stride-2, padding-1 convs keep an odd side's edge
            height, width = -(-height // 2), -(-width // 2)
        if height * width != num_tokens:
            raise ValueError(
                f"ToDo: {num_tokens} tokens are no level's grid of the {self.latent_size[0]}x{self.latent_size[1]} "
                "latent (each level halves it, rounding up), so their 2-D layout is unknown"
            )
        return height, width


def check_downsampling(downsample_factor, method) -> None:
    """A ValueError unless ``downsample_factor`` is a positive int and ``method`` one of ``METHODS``."""
    if isinstance(downsample_factor, bool) or not isinstance(downsample_factor, int) or downsample_factor < 1:
        raise ValueError(
            f"ToDo's downsample_factor must be an int >= 1 (1 = plain attention); got {downsample_factor!r}")
    if method not in METHODS:
        raise ValueError(f"ToDo's method must be one of {', '.join(METHODS)}; got {method!r}")


def downsample_tokens(tokens: torch.Tensor, grid: tuple[int, int], factor: int, method: str) -> torch.Tensor:
    """(B, H*W, C) tokens of an H x W grid (row-major) -> (B, H*W / factor^2, C), one token per window."""
    batch, _, channels = tokens.shape
    height, width = grid
    if height % factor or width % factor:
        raise ValueError(f"ToDo cannot downsample a {height}x{width} token grid by {factor}: both sides must be "
                         "multiples of the factor (choose another factor or image size)")
    if factor == 1:
        return tokens
    # Channels last, as the tokens already are: the windows are strided views, no transpose to (B, C, H, W).
    windows = tokens.reshape(batch, height // factor, factor, width // factor, factor, channels)
    kept = windows[:, :, 0, :, 0] if method == "nearest" else windows.mean(dim=(2, 4))
    return kept.reshape(batch, -1, channels)


def why_not_todo(attn: Attention) -> str | None:
    """None when ``attn`` is a plain self-attention ToDo can run, else why not."""
    if attn.is_cross_attention:
        return "it is a cross-attention (ToDo downsamples a self-attention's own tokens)"
    extras = [name for name in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(attn, name) is not None]
    if attn.residual_connection:
        extras.append("residual_connection")
    if attn.rescale_output_factor != 1.0:
        extras.append("rescale_output_factor")
    if extras:
        return f"it has {', '.join(extras)}, which ToDo's processor does not compute"
    return None


class ToDoAttnProcessor:
    """Self-attention with keys and values from the token grid downsampled by ``downsample_factor``
    (module docstring). ``state`` holds the latent size the grid is derived from (``apply_todo`` shares
    one among its processors)."""

    def __init__(self, downsample_factor: int = 2, method: str = "nearest", state: ToDoState | None = None):
        check_downsampling(downsample_factor, method)
        self.downsample_factor = downsample_factor
        self.method = method
        self.state = state if state is not None else ToDoState()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        reason = why_not_todo(attn)
        if encoder_hidden_states is not None or attention_mask is not None:
            reason = "it was called with encoder_hidden_states or an attention_mask"
        if hidden_states.ndim != 3:
            reason = f"it takes (B, N, C) tokens, not a {hidden_states.ndim}-D input"
        if reason is not None:
            raise ValueError(f"ToDoAttnProcessor cannot run this attention: {reason}")
        batch, num_tokens, _ = hidden_states.shape
        grid = self.state.grid_of(num_tokens)
        kv_source = downsample_tokens(hidden_states, grid, self.downsample_factor, self.method)
        query, key, value = attn.to_q(hidden_states), attn.to_k(kv_source), attn.to_v(kv_source)
        query, key, value = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, num_tokens, -1)
        self.state.calls += 1
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class ToDoPatch:
    """What ``apply_todo`` changed on a UNet, for ``remove_todo`` to undo."""

    state: ToDoState
    previous_processors: dict[str, object] = field(default_factory=dict)  # attn1 module name -> processor
    hook: torch.utils.hooks.RemovableHandle | None = None


def _unet_of(pipe_or_unet) -> UNet2DConditionModel:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"apply_todo/remove_todo expect a UNet2DConditionModel or a pipeline with one; got "
                        f"{type(pipe_or_unet).__name__}")
    return unet


def self_attention_by_level(unet: UNet2DConditionModel) -> dict[int, dict[str, Attention]]:
    """Every transformer self-attention (``attn1``) of the UNet, by level and then by module name."""
    by_level = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn1") and isinstance(module, Attention):
            by_level.setdefault(block_level(name, unet), {})[name] = module
    return dict(sorted(by_level.items()))


def todo_targets(unet: UNet2DConditionModel, levels: tuple[int, ...] | None = None) -> dict[str, Attention]:
    """The ``attn1`` modules ToDo patches, by name: those at ``levels``, or (None) at the highest-resolution
    level that has attention."""
    by_level = self_attention_by_level(unet)
    if not by_level:
        raise ValueError("ToDo: this UNet has no transformer self-attention (attn1) to downsample")
    chosen = (min(by_level),) if levels is None else tuple(levels)
    missing = [level for level in chosen if level not in by_level]
    if missing:
        raise ValueError(f"ToDo: levels {missing} have no self-attention; this UNet has it at levels {list(by_level)} "
                         "(1 = full latent resolution)")
    targets = {name: module for level in chosen for name, module in by_level[level].items()}
    for name, module in targets.items():
        reason = why_not_todo(module)
        if reason is not None:
            raise ValueError(f"ToDo cannot patch {name}: {reason}")
    return targets


def apply_todo(pipe_or_unet, downsample_factor: int = 2, method: str = "nearest",
               levels: tuple[int, ...] | None = None) -> UNet2DConditionModel:
    """Install ToDo on the self-attention of ``levels`` (None: the highest-resolution attention level).
    Idempotent: an earlier ToDo patch is removed first. Either every target gets its processor or, when one
    refuses it (an AT-EDM pruning layer does), nothing changes. Returns the UNet."""
    unet = _unet_of(pipe_or_unet)
    check_downsampling(downsample_factor, method)
    remove_todo(unet)
    targets = todo_targets(unet, levels)
    patch = ToDoPatch(ToDoState())
    try:
        for name, attn in targets.items():
            previous = attn.processor
            attn.set_processor(ToDoAttnProcessor(downsample_factor, method, patch.state))
            patch.previous_processors[name] = previous
    except Exception:
        _restore_processors(unet, patch.previous_processors)
        raise
    patch.hook = unet.register_forward_pre_hook(patch.state.record_latent_size, with_kwargs=True)
    setattr(unet, _PATCH_ATTRIBUTE, patch)
    return unet


def _restore_processors(unet: UNet2DConditionModel, processors: dict[str, object]) -> None:
    for name, processor in processors.items():
        unet.get_submodule(name).set_processor(processor)


def remove_todo(pipe_or_unet) -> UNet2DConditionModel:
    """Put back the processors ``apply_todo`` replaced and remove its hook; a no-op on an unpatched UNet."""
    unet = _unet_of(pipe_or_unet)
    patch = unet.__dict__.pop(_PATCH_ATTRIBUTE, None)
    if patch is not None:
        patch.hook.remove()
        _restore_processors(unet, patch.previous_processors)
    return unet


def get_todo_state(pipe_or_unet) -> ToDoState | None:
    """The state of the ToDo patch on this UNet (None when unpatched)."""
    patch = _unet_of(pipe_or_unet).__dict__.get(_PATCH_ATTRIBUTE)
    return None if patch is None else patch.state


@functools.lru_cache(maxsize=1)
def _meta_unet(unet_config_json: str) -> UNet2DConditionModel:
    from atedm.flops import build_meta_unet

    return build_meta_unet(json.loads(unet_config_json))


@functools.lru_cache(maxsize=64)
def _count(unet_config_json: str, height: int, width: int, downsample_factor: int, method: str,
           levels: tuple[int, ...] | None) -> float:
    # atedm.flops's counted pass, reused as it is, so ToDo is counted exactly as the UNet and AT-EDM are.
    from atedm.flops import count_pass
    from atedm.flops import example_inputs

    unet = _meta_unet(unet_config_json)  # one meta UNet, patched and unpatched per count
    apply_todo(unet, downsample_factor, method, levels)
    try:
        total, _ = count_pass(unet, example_inputs(json.loads(unet_config_json), 1, height, width), None)
    finally:
        remove_todo(unet)
    return total


def todo_flops(unet_config: dict, height: int, width: int, downsample_factor: int, method: str = "nearest",
               levels: tuple[int, ...] | None = None) -> float:
    """FLOPs of one ToDo-patched UNet pass for one image at an image size (latent = image / 8), counted on
    the meta device. ``method`` changes no counted FLOP (module docstring); factor 1 is the plain UNet's."""
    check_downsampling(downsample_factor, method)
    config_json = json.dumps(unet_config, sort_keys=True, default=str)
    return _count(config_json, height, width, downsample_factor, method, None if levels is None else tuple(levels))


def main() -> None:
    from atedm.unets import load_unet_config
    from benchmarks.common import git_sha, markdown_table

    parser = argparse.ArgumentParser(description="Counted UNet TFLOPs per image per pass with ToDo (meta device).")
    parser.add_argument("--unet-config", default="sdxl-base", help="a shipped layout name or a config.json path")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--factors", default="2,4", help="comma-separated downsampling factors")
    parser.add_argument("--levels", default="default;all",
                        help="semicolon-separated level sets: 'default' (highest-resolution attention level), "
                             "'all' (every attention level) or comma-separated levels, e.g. '2;2,3'")
    args = parser.parse_args()
    config = load_unet_config(args.unet_config)
    attention_levels = tuple(self_attention_by_level(_meta_unet(json.dumps(config, sort_keys=True, default=str))))
    full = todo_flops(config, args.height, args.width, 1)
    rows = [{"config": "full", "levels": "-", "tflops": f"{full / 1e12:.3f}", "saved": "-"}]
    for spec in args.levels.split(";"):
        named = {"default": None, "all": attention_levels}
        levels = named[spec] if spec in named else tuple(int(level) for level in spec.split(","))
        for factor in (int(f) for f in args.factors.split(",")):
            flops = todo_flops(config, args.height, args.width, factor, levels=levels)
            label = ",".join(map(str, levels)) if levels else f"{min(attention_levels)} (default)"
            rows.append({"config": f"todo f={factor}", "levels": label, "tflops": f"{flops / 1e12:.3f}",
                         "saved": f"{100 * (1 - flops / full):.1f}%"})
    print(f"{args.unet_config} at {args.height}x{args.width}, one image per pass, counted on the meta device "
          f"(torch {torch.__version__}, diffusers {diffusers.__version__}, git {git_sha()})")
    print(markdown_table(rows, ["config", "levels", "tflops", "saved"]))


if __name__ == "__main__":
    main()
