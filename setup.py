"""atedm: AT-EDM token pruning for Stable Diffusion XL, with fused Triton kernels."""

from setuptools import find_packages, setup

setup(
    name="atedm",
    version="0.1.0",
    description="Training-free token pruning (AT-EDM) for SDXL in diffusers, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["atedm", "atedm.*", "atedm_kernels", "atedm_kernels.*"]),
    package_data={"atedm": ["data/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        # The supported range is enforced at apply() time too (atedm/compat.py) with a clear message.
        "diffusers>=0.30,<0.43",
        "numpy",
        "safetensors",
        "packaging",
    ],
    extras_require={
        # transformers builds the text encoders of real pipelines and of the tiny one the tests save.
        "pipeline": ["transformers>=4.40", "accelerate"],
        # The COCO FID/CLIP harness's default feature extractors (both pull torchvision).
        "eval": ["clean-fid", "open_clip_torch", "scipy", "matplotlib", "tomesd"],
        # The fidelity benchmarks on the small trained UNets and the frontier's peer methods (ToMe, DeepCache).
        "fidelity": ["scikit-learn", "scipy", "tomesd", "matplotlib", "DeepCache"],
        # accelerate, peft and DeepCache: the composition tests (cpu offload, LoRA, DeepCache + AT-EDM).
        "dev": ["pytest>=8", "hypothesis", "transformers>=4.40", "scipy", "scikit-learn", "tomesd", "matplotlib",
                "accelerate", "peft", "DeepCache"],
    },
    entry_points={"console_scripts": ["atedm=atedm.cli:main"]},
)
