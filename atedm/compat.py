"""The diffusers versions atedm supports, checked when a model is patched."""

from __future__ import annotations

from packaging.version import Version

# The hook points atedm uses (Transformer2DModel.transformer_blocks, BasicTransformerBlock.attn1 and
# its processor, module hooks) exist unchanged across this range; 0.42.1 is what CI tests.
MIN_DIFFUSERS = Version("0.30.0")
MAX_DIFFUSERS_EXCLUSIVE = Version("0.43.0")


def check_diffusers_version(version: str | None = None) -> None:
    """Raise a RuntimeError naming the supported range when the installed diffusers is outside it."""
    if version is None:
        import diffusers

        version = diffusers.__version__
    parsed = Version(version)
    if not MIN_DIFFUSERS <= Version(parsed.base_version) < MAX_DIFFUSERS_EXCLUSIVE:
        raise RuntimeError(
            f"atedm supports diffusers >={MIN_DIFFUSERS},<{MAX_DIFFUSERS_EXCLUSIVE}; found {version}. "
            "Install a supported diffusers release."
        )
