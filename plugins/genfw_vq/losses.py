"""The VQ-GAN objective (Esser et al. 2021, eq. 4-6) with the Unleashing Transformers changes
(Bond-Taylor et al., sec. 3.4, eq. 9): a PatchGAN discriminator with hinge loss, the adaptive
weight clamped at lambda_max, and DiffAugment on every discriminator input.

Generator loss::

    |x - x_hat| + w_p * LPIPS(x, x_hat) + lambda * (-mean D(x_hat)) + w_cb * L_VQ
    lambda = min(||grad_L rec|| / (||grad_L G|| + 1e-4), lambda_max) * disc_weight

with L the decoder's last layer. ``lambda_max=None`` gives taming-transformers' clamp at 1e4.
Before ``disc_start`` the adversarial term is absent and the discriminator is not run.
Module names follow taming-transformers' ``VQLPIPSWithDiscriminator`` (``discriminator.main``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genfw_vq.diffaug import diff_augment
from genfw_vq.lpips import LPIPS, load_lpips

TAMING_LAMBDA_CLAMP = 1e4  # taming-transformers' upper clamp of the adaptive weight


def _weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): ``n_layers`` stride-2 4x4 convs, BatchNorm, LeakyReLU 0.2."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class VQGANLoss(nn.Module):
    """Reconstruction, perceptual and adversarial terms; owns the discriminator.

    The LPIPS network is loaded on first use and kept out of the state dict (it is a fixed,
    user-supplied network, not part of the trained model).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        disc_start: int,
        disc_weight: float,
        codebook_weight: float,
        perceptual_weight: float,
        lambda_max: float | None,
        diffaug: bool,
        disc_layers: int,
        disc_ndf: int,
        perceptual_weights: str | None,
    ) -> None:
        super().__init__()
        self.discriminator = NLayerDiscriminator(in_channels, disc_ndf, disc_layers)
        self.disc_start, self.disc_weight, self.codebook_weight = disc_start, disc_weight, codebook_weight
        self.perceptual_weight, self.lambda_max, self.diffaug = perceptual_weight, lambda_max, diffaug
        self.perceptual_weights = perceptual_weights
        self._lpips: list[LPIPS] = []  # a list, so that the module is not registered

    def perceptual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance (loads the network on first call; raises ConfigError if absent)."""
        if not self._lpips:
            self._lpips.append(load_lpips(self.perceptual_weights))
        net = self._lpips[0]
        if next(net.parameters()).device != x.device:
            net.to(x.device)
        return net(x.float(), y.float()).mean()

    def disc_input(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x) if self.diffaug else x

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """lambda = min(||grad rec|| / (||grad G|| + 1e-4), lambda_max) * disc_weight, detached."""
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        ratio = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
        limit = TAMING_LAMBDA_CLAMP if self.lambda_max is None else self.lambda_max
        return ratio.clamp(0.0, limit).detach() * self.disc_weight

    def forward(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        codebook_loss: torch.Tensor,
        step: int,
        last_layer: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Losses {"generator", and from ``disc_start`` on "discriminator"} and float logs."""
        x, x_hat = images.float(), recon.float()
        l1 = (x - x_hat).abs().mean()
        rec = l1
        logs: dict[str, float] = {"l1": float(l1.detach())}
        if self.perceptual_weight > 0:
            p = self.perceptual(x, x_hat)
            rec = rec + self.perceptual_weight * p
            logs["perceptual"] = float(p.detach())
        generator = rec + self.codebook_weight * codebook_loss
        losses = {}
        active = step >= self.disc_start
        logs["disc_active"] = float(active)
        if active:
            g_loss = -self.discriminator(self.disc_input(x_hat)).mean()
            lam = self.adaptive_weight(rec, g_loss, last_layer)
            generator = generator + lam * g_loss
            logits_real = self.discriminator(self.disc_input(x.detach()))
            logits_fake = self.discriminator(self.disc_input(x_hat.detach()))
            losses["discriminator"] = hinge_d_loss(logits_real, logits_fake)
            logs.update({"g_loss": float(g_loss.detach()), "d_weight": float(lam),
                         "logits_real": float(logits_real.detach().mean()),
                         "logits_fake": float(logits_fake.detach().mean())})
        losses["generator"] = generator
        logs["rec_loss"] = float(rec.detach())
        return losses, logs
