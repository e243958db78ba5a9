"""LPIPS perceptual distance with VGG16 features (Zhang et al. 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric"), the perceptual loss of VQ-GAN.

Features relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of an ImageNet VGG16 are unit-normalised
over channels, their squared differences weighted by learned 1x1 "linear" layers, averaged over
space and summed. Module names follow taming-transformers' ``LPIPS`` (``net.sliceN``,
``linN.model.1``, ``scaling_layer``), so its ``loss.perceptual_loss.*`` tensors load as they are.

Weights are never downloaded. :func:`resolve_weights` finds them (see docs/tokenizers.md):
a file named by ``perceptual_weights`` holding the whole network (or only the linear layers,
with VGG16 from the torch hub cache), else the torch hub cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from genfw.errors import ConfigError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights, as torch hub caches them
LIN_FILES = ("lpips_vgg.pth", "vgg.pth")  # LPIPS v0.1 linear layers (richzhang/taming name them vgg.pth)
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # VGG16 feature indices up to each relu_k
_CHANNELS = (64, 128, 256, 512, 512)


class ScalingLayer(nn.Module):
    """[-1, 1] images -> the input statistics LPIPS's VGG expects."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 conv to one channel (after dropout, as in LPIPS's training; idle in eval mode)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` cut into the five LPIPS slices."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        # Built on the meta device: the classifier (123M parameters) is never materialised.
        with torch.device("meta"):
            features = vgg16(weights=None).features
        for i, (start, end) in enumerate(_SLICES, 1):
            setattr(self, f"slice{i}", nn.Sequential())
            for j in range(start, end):
                getattr(self, f"slice{i}").add_module(str(j), features[j])
        self.to_empty(device="cpu")
        for p in self.parameters():
            nn.init.zeros_(p)  # deterministic until real weights are loaded

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


def _normalise(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 distance: ``lpips(x, y)`` -> [B, 1, 1, 1] for images in [-1, 1].

    A new instance holds zeros; use :func:`load_lpips` for a usable one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for i, c in enumerate(_CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: the linear layers' dropout stays off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # greyscale: the same plane on all three VGG inputs
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0
        for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
            diff = (_normalise(a) - _normalise(b)).pow(2)
            total = total + getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


# --------------------------------------------------------------------------------------------
# finding and loading weights


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from genfw.convert import read_torch_file

    state = read_torch_file(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a bare LPIPS state dict, or one inside a taming checkpoint (``loss.perceptual_loss.``)."""
    for prefix in ("loss.perceptual_loss.", "perceptual_loss."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _vgg_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``features.N.*`` names -> ``net.sliceK.N.*``."""
    out = {}
    for k, v in state.items():
        if not k.startswith("features."):
            continue
        idx, rest = k[len("features."):].split(".", 1)
        for s, (start, end) in enumerate(_SLICES, 1):
            if start <= int(idx) < end:
                out[f"net.slice{s}.{idx}.{rest}"] = v
    return out


def hub_dir() -> Path:
    """Where torch hub caches weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lpips_package_file() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # the `lpips` pip package ships the linear layers
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def _missing_message(detail: str) -> str:
    hub = hub_dir()
    return (
        f"perceptual_weight > 0 needs LPIPS-VGG16 weights, but {detail}. Either put torchvision's VGG16 "
        f"ImageNet weights at {hub / VGG16_FILE} (https://download.pytorch.org/models/{VGG16_FILE}) and "
        f"the LPIPS v0.1 linear layers at {hub / LIN_FILES[0]} (vgg.pth from "
        "https://github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1), or set the "
        "tokenizer's perceptual_weights to one .pth/.safetensors file holding the whole LPIPS network "
        "(a taming-transformers VQ-GAN checkpoint works), or set perceptual_weight: 0"
    )


def missing_weights(perceptual_weights: str | os.PathLike | None) -> str | None:
    """What is missing for :func:`resolve_weights`, from file existence alone (cheap), or None.

    One line for pre-flight checks: a named file that does not exist, or no VGG16 / linear
    layers in the torch hub cache, with the short fix.
    """
    fix = "see docs/tokenizers.md (LPIPS weights) or set tokenizer.params.perceptual_weight=0"
    if perceptual_weights is not None:
        path = Path(os.path.expanduser(os.fspath(perceptual_weights)))
        return None if path.is_file() else f"perceptual_weights file {path} does not exist: {fix}"
    vgg = hub_dir() / VGG16_FILE
    if not vgg.is_file():
        return f"LPIPS needs VGG16 weights at {vgg} (not there; genfw never downloads): {fix}"
    candidates = [hub_dir() / name for name in LIN_FILES] + [_lpips_package_file()]
    if not any(c is not None and c.is_file() for c in candidates):
        return f"LPIPS needs its linear layers at {hub_dir() / LIN_FILES[0]} (not there): {fix}"
    return None


def resolve_weights(perceptual_weights: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """The full LPIPS state dict from ``perceptual_weights`` and/or the torch hub cache.

    Raises :class:`ConfigError` saying which file to put where when they cannot be found.
    """
    state: dict[str, torch.Tensor] = {}
    if perceptual_weights is not None:
        path = Path(os.path.expanduser(os.fspath(perceptual_weights)))
        if not path.is_file():
            raise ConfigError(_missing_message(f"perceptual_weights file {path} does not exist"))
        try:
            state = _strip(_read(path))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ConfigError(f"cannot read perceptual_weights {path}: {type(e).__name__}: {e}") from None
        if any(k.startswith("features.") for k in state):
            state = {**_vgg_from_torchvision(state), **{k: v for k, v in state.items() if k.startswith("lin")}}
    has_vgg = any(k.startswith("net.") for k in state)
    has_lin = any(k.startswith("lin") for k in state)
    if not has_vgg:
        vgg = hub_dir() / VGG16_FILE
        if not vgg.is_file():
            raise ConfigError(_missing_message(f"no VGG16 weights were found ({vgg} does not exist)"))
        state.update(_vgg_from_torchvision(_read(vgg)))
    if not has_lin:
        candidates = [hub_dir() / name for name in LIN_FILES] + [_lpips_package_file()]
        found = next((c for c in candidates if c is not None and c.is_file()), None)
        if found is None:
            raise ConfigError(_missing_message("no LPIPS linear-layer weights were found"))
        state.update({k: v for k, v in _strip(_read(found)).items() if k.startswith("lin")})
    return state


def load_lpips(perceptual_weights: str | os.PathLike | None = None) -> LPIPS:
    """A frozen LPIPS network with weights from :func:`resolve_weights` (never downloads)."""
    model = LPIPS()
    state = resolve_weights(perceptual_weights)
    expected = {k for k in model.state_dict() if not k.startswith("scaling_layer.")}
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(f"LPIPS weights are incomplete: missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"LPIPS weights do not fit the VGG16 network: {str(e).splitlines()[0]}") from None
    return model
