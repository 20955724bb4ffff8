"""The default metric models, from the field's libraries, and getting their weights without hanging.

* FID features (``--fid-backend``):
  - ``clean-fid`` (default): clean-fid's InceptionV3 (the torchscript port of TF-Inception, pool3, 2048-d)
    and its resize for the mode (``clean``: PIL bicubic to 299 x 299 in float), exactly what
    ``cleanfid.fid.compute_fid`` feeds the network; weights ``inception-2015-12-05.pt``, cached where
    clean-fid caches them (``/tmp``).
  - ``torch-fidelity``: torch-fidelity's ``inception-v3-compat`` (pool3, 2048-d, TF-compatible bilinear
    resize inside the network): the network ``torchmetrics``' FID uses; weights in torch hub's cache.
* CLIP score: open_clip (``ViT-g-14`` / ``laion2b_s34b_b88k`` by default, any open_clip model / tag or a
  local checkpoint file).

Your own models instead (``--feature-extractor`` / ``--clip-scorer module:callable``): imported by the
process that computes the metrics and called with its device (``build_feature_extractor``).

Offline machines: pass the weights as files (``--fid-weights``, ``--clip-pretrained /path/to/ckpt``) or
fill the caches beforehand. Downloads run under a socket timeout (``--download-timeout``), so a machine
without network gets a clear error instead of a hang; clean-fid's Inception file is downloaded here, to a
temp file renamed into place, because clean-fid's own download writes the final file in place (an
interrupted download would leave a truncated file that every later run fails to load).

These libraries pull torchvision; they are imported only when a default model is needed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import platform
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .generate import _write_atomically

CLEANFID_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
TORCH_FIDELITY_NAME = "inception-v3-compat"
INSTALL_HINT = "pip install 'atedm[eval]' (or pass your own feature_extractor / clip_scorer)"


def cleanfid_cache_folder() -> Path:
    """Where clean-fid itself keeps ``inception-2015-12-05.pt`` (``cleanfid.features.feature_extractor``)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


@contextlib.contextmanager
def network_timeout(seconds: float):
    """A default socket timeout for the libraries' own downloads (urllib, torch.hub), restored afterwards."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if seconds > 0 else None)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def import_backend(module: str, package: str, purpose: str):
    """``import module``, or an ImportError saying which package to install or why it failed to import."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise ImportError(f"{purpose} needs {package}: {INSTALL_HINT}")
    try:
        return importlib.import_module(module)
    except Exception as error:  # e.g. a torchvision that does not match torch fails with a RuntimeError
        raise ImportError(f"{purpose} needs {package}, which is installed but fails to import "
                          f"({type(error).__name__}: {error}); check that torchvision matches torch") from error


def download_atomically(url: str, path: Path, timeout_s: float, what: str, offline_hint: str) -> Path:
    """Download ``url`` to ``path`` (a temp file renamed into place); a clear RuntimeError when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s if timeout_s > 0 else None) as response:
            _write_atomically(path, lambda handle: shutil.copyfileobj(response, handle, 1 << 20))
    except (OSError, ValueError) as error:  # URLError, HTTPError, socket timeouts; ValueError: a bad URL
        raise RuntimeError(f"could not download {what} from {url} ({type(error).__name__}: {error}). "
                           f"Is this machine offline? {offline_hint}") from error
    return path


def cleanfid_weights(weights: Path | None, timeout_s: float) -> Path:
    """The clean-fid Inception file: ``weights`` if given, else clean-fid's cached copy, downloaded if missing."""
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"FID weights file {weights} does not exist")
        if weights.name != CLEANFID_INCEPTION_FILE:
            raise ValueError(f"clean-fid loads its Inception weights by file name: name {weights} {CLEANFID_INCEPTION_FILE}")
        return weights
    path = cleanfid_cache_folder() / CLEANFID_INCEPTION_FILE
    if not path.is_file():
        download_atomically(CLEANFID_INCEPTION_URL, path, timeout_s, "clean-fid's Inception weights",
                            f"Download {CLEANFID_INCEPTION_FILE} on a machine with network and pass it with --fid-weights.")
    return path


def _supports(function, argument: str) -> bool:
    try:
        return argument in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _group_by_shape(arrays: list[np.ndarray]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for index, array in enumerate(arrays):
        groups.setdefault(array.shape, []).append(index)
    return groups


class CleanFIDInception:
    """clean-fid's InceptionV3 features and resize for ``mode``, fed exactly as clean-fid feeds them."""

    def __init__(self, device: str, mode: str = "clean", weights: Path | None = None, download_timeout_s: float = 60.0):
        features = import_backend("cleanfid.features", "clean-fid", "the default FID features (clean-fid)")
        resize = import_backend("cleanfid.resize", "clean-fid", "the default FID features (clean-fid)")
        self.name = f"clean-fid InceptionV3 pool3 (2048-d), mode {mode!r}"
        self.device = torch.device(device)
        self.resize = resize.build_resizer(mode)
        if mode == "legacy_pytorch":
            # pytorch-fid's Inception: clean-fid fetches its weights through torch.hub.
            if weights is not None:
                raise ValueError("--fid-weights is for clean-fid's torchscript Inception (modes clean and "
                                 "legacy_tensorflow); legacy_pytorch reads torch hub's cache")
            build = features.build_feature_extractor
            kwargs = {"use_dataparallel": False} if _supports(build, "use_dataparallel") else {}
            try:
                with network_timeout(download_timeout_s):
                    self.model = build(mode, self.device, **kwargs)
            except (OSError, RuntimeError) as error:
                raise RuntimeError(f"could not get the legacy_pytorch Inception weights ({type(error).__name__}: {error}). "
                                   "Is this machine offline? Fill torch hub's cache or use mode clean.") from error
            return
        from cleanfid.inception_torchscript import InceptionV3W

        path = cleanfid_weights(weights, download_timeout_s)
        try:
            # clean-fid's feature_extractor("torchscript_inception"), without its DataParallel wrapper.
            model = InceptionV3W(str(path.parent), download=False, resize_inside=mode == "legacy_tensorflow")
        except Exception as error:
            raise RuntimeError(f"could not load clean-fid's Inception weights {path} ({type(error).__name__}: {error}); "
                               "a truncated download? Delete the file and run again") from error
        self.model = model.to(self.device).eval()

    def __call__(self, images):
        # clean-fid's ResizeDataset: uint8 RGB array -> resizer -> CHW float in [0, 255] (uint8 results
        # through ToTensor and * 255). Images are batched by size: legacy_tensorflow resizes inside the net.
        arrays = [np.asarray(self.resize(np.asarray(image.convert("RGB")))) for image in images]
        rows: list = [None] * len(arrays)
        for indices in _group_by_shape(arrays).values():
            batch = torch.from_numpy(np.stack([arrays[i] for i in indices]).transpose(0, 3, 1, 2).copy())
            batch = batch.float().div(255) * 255 if batch.dtype == torch.uint8 else batch.float()
            with torch.no_grad():
                features = self.model(batch.to(self.device)).double().cpu().numpy()
            for row, index in zip(features, indices):
                rows[index] = row
        return np.stack(rows)


class TorchFidelityInception:
    """torch-fidelity's ``inception-v3-compat`` pool3 features (the network of torchmetrics' FID)."""

    def __init__(self, device: str, weights: Path | None = None, download_timeout_s: float = 60.0):
        module = import_backend("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity",
                                "the torch-fidelity FID features")
        self.name = f"torch-fidelity {TORCH_FIDELITY_NAME} pool3 (2048-d)"
        self.device = torch.device(device)
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"FID weights file {weights} does not exist")
        try:
            with network_timeout(download_timeout_s):
                model = module.FeatureExtractorInceptionV3(
                    TORCH_FIDELITY_NAME, ["2048"], feature_extractor_weights_path=None if weights is None else str(weights))
        except (OSError, RuntimeError) as error:
            raise RuntimeError(f"could not get torch-fidelity's Inception weights ({type(error).__name__}: {error}). "
                               "Is this machine offline? Download weights-inception-2015-12-05-6726825d.pth "
                               "elsewhere and pass it with --fid-weights.") from error
        self.model = model.to(self.device).eval()

    def __call__(self, images):
        # uint8 NCHW, any size: the network resizes to 299 itself (TF1-compatible bilinear).
        arrays = [np.asarray(image.convert("RGB")) for image in images]
        rows: list = [None] * len(arrays)
        for indices in _group_by_shape(arrays).values():
            batch = torch.from_numpy(np.stack([arrays[i] for i in indices]).transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                features = self.model(batch.to(self.device))[0].double().cpu().numpy()
            for row, index in zip(features, indices):
                rows[index] = row
        return np.stack(rows)


def check_clip_names(open_clip, model: str, pretrained: str) -> None:
    """Refuse an open_clip model or tag that open_clip does not know, listing what it knows (no download)."""
    if model.startswith(("hf-hub:", "local-dir:")):
        return
    if model not in open_clip.list_models():
        raise ValueError(f"open_clip has no model {model!r}; e.g. {', '.join(sorted(open_clip.list_models())[:8])}, ...")
    if pretrained and not Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(model, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {model} (known: {tags}); "
                         "or pass a local checkpoint file")


def _clip_offline_hint(model: str, pretrained: str) -> str:
    return (f"Is this machine offline? Pass the {model} checkpoint as a file (--clip-pretrained /path/to/"
            "open_clip_pytorch_model.bin) or fill the Hugging Face cache (HF_HOME) beforehand.")


class OpenCLIPScore:
    """Cosine similarity of open_clip image and text embeddings (ViT-g-14 laion2b_s34b_b88k by default)."""

    def __init__(self, device: str, model: str = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k",
                 download_timeout_s: float = 60.0):
        open_clip = import_backend("open_clip", "open_clip_torch", "the default CLIP score (open_clip)")
        check_clip_names(open_clip, model, pretrained)
        self.name = f"open_clip {model} {pretrained}, cosine similarity"
        self.device = torch.device(device)
        try:
            with network_timeout(download_timeout_s):
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=self.device)
        except (OSError, RuntimeError) as error:  # open_clip reports a failed download as a RuntimeError
            raise RuntimeError(f"could not build open_clip {model} with weights {pretrained!r} "
                               f"({type(error).__name__}: {error}). {_clip_offline_hint(model, pretrained)}") from error
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)

    def __call__(self, images, captions):
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        tokens = self.tokenizer(list(captions)).to(self.device)
        with torch.no_grad():
            image_embeds = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            text_embeds = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_embeds * text_embeds).sum(dim=-1).double().cpu().numpy()


def import_factory(spec: str, option: str):
    """The callable that a ``module:callable`` spec names (``--feature-extractor``, ``--clip-scorer``)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"{option} {spec}: cannot import {module_name} ({error}); is it on PYTHONPATH?") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{option} {spec}: module {module_name} has no callable {name!r}")
    return factory


def build_feature_extractor(settings, device: str):
    """The run's FID features: ``settings.feature_extractor_factory``'s, else the ``fid_backend``'s."""
    if settings.feature_extractor_factory is not None:
        return import_factory(settings.feature_extractor_factory, "--feature-extractor")(device)
    if settings.fid_backend == "torch-fidelity":
        return TorchFidelityInception(device, settings.fid_weights, settings.download_timeout_s)
    return CleanFIDInception(device, settings.fid_mode, settings.fid_weights, settings.download_timeout_s)


def build_clip_scorer(settings, device: str):
    """The run's CLIP score: ``settings.clip_scorer_factory``'s, else open_clip's."""
    if settings.clip_scorer_factory is not None:
        return import_factory(settings.clip_scorer_factory, "--clip-scorer")(device)
    return OpenCLIPScore(device, settings.clip_model, settings.clip_pretrained, settings.download_timeout_s)


def check_default_metrics(settings, feature_extractor=None, clip_scorer=None, fetch: bool = False) -> None:
    """Before hours of generation: the default metric libraries import, the names are known, and (``fetch``)
    their weights are on disk, downloaded now if missing. Injected extractors are not checked; those named
    by a ``module:callable`` setting are imported (a typo fails now, not after the images)."""
    if feature_extractor is None and settings.feature_extractor_factory is not None:
        import_factory(settings.feature_extractor_factory, "--feature-extractor")
    elif feature_extractor is None:
        if settings.fid_backend == "clean-fid":
            import_backend("cleanfid.features", "clean-fid", "the default FID features (clean-fid)")
            if settings.fid_mode != "legacy_pytorch" and (fetch or settings.fid_weights is not None):
                cleanfid_weights(settings.fid_weights, settings.download_timeout_s)
        else:
            module = import_backend("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity",
                                    "the torch-fidelity FID features")
            if settings.fid_weights is not None and not settings.fid_weights.is_file():
                raise FileNotFoundError(f"FID weights file {settings.fid_weights} does not exist")
            if fetch and settings.fid_weights is None:
                try:
                    with network_timeout(settings.download_timeout_s):
                        torch.hub.load_state_dict_from_url(module.URL_INCEPTION_V3, map_location="cpu", progress=False)
                except (OSError, RuntimeError) as error:
                    raise RuntimeError(f"could not download torch-fidelity's Inception weights ({error}). Is this "
                                       "machine offline? Pass them with --fid-weights.") from error
    if clip_scorer is None and settings.clip_scorer_factory is not None:
        import_factory(settings.clip_scorer_factory, "--clip-scorer")
    elif clip_scorer is None:
        open_clip = import_backend("open_clip", "open_clip_torch", "the default CLIP score (open_clip)")
        check_clip_names(open_clip, settings.clip_model, settings.clip_pretrained)
        if fetch and settings.clip_pretrained and not Path(settings.clip_pretrained).is_file():
            config = open_clip.get_pretrained_cfg(settings.clip_model, settings.clip_pretrained)
            if config:
                try:
                    with network_timeout(settings.download_timeout_s):
                        open_clip.download_pretrained(config)
                except Exception as error:  # hub and url errors of several kinds
                    raise RuntimeError(f"could not download open_clip {settings.clip_model} {settings.clip_pretrained} "
                                       f"({type(error).__name__}: {error}). "
                                       f"{_clip_offline_hint(settings.clip_model, settings.clip_pretrained)}") from error
