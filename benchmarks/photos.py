"""Real photographs for agreement checks, and random weights that behave like trained ones on them.

No pretrained weights can be downloaded here, so precision checks run on randomly initialised
networks whose BatchNorm statistics are set from the photos themselves and whose classifier is
scaled so that predictions differ from photo to photo (a network that predicts one class for every
input would make a top-1 agreement figure meaningless).
"""

from __future__ import annotations

import torch

from vafunc.serving import transforms as T

# scikit-image's bundled colour photographs (no download needed)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def photos(names=PHOTOS) -> list[torch.Tensor]:
    """uint8 ``[3, H, W]`` tensors of scikit-image's sample photographs."""
    from skimage import data as skdata

    return [torch.from_numpy(getattr(skdata, n)()[..., :3]).permute(2, 0, 1).contiguous() for n in names]


def photo_crops(
    size: int = 224,
    *,
    flips: bool = True,
    names=PHOTOS,
    resize: int | None = None,
    interpolation: str = "bilinear",
    mean=T.IMAGENET_MEAN,
    std=T.IMAGENET_STD,
) -> torch.Tensor:
    """Normalised crops ``[N, 3, size, size]`` (ImageNet mean/std by default): each photo resized so
    its shorter side is ``resize`` (default ``size * 8 / 7``), then the centre and four corner
    crops (and their mirror images)."""
    out = []
    resize = round(size * 8 / 7) if resize is None else resize
    for img in photos(names):
        big = T.normalize(T.to_float(T.resize(img, resize, interpolation)), mean, std)
        h, w = big.shape[-2:]
        crops = [T.center_crop(big, size)]
        crops += [big[:, i : i + size, j : j + size] for i in (0, h - size) for j in (0, w - size)]
        if flips:
            crops += [c.flip(-1) for c in crops]
        out += crops
    return torch.stack(out)


@torch.no_grad()
def realistic_random(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """Perturb a randomly initialised reference module in place, set its BatchNorm statistics
    from ``x`` (a cumulative average over the batch) and scale its classifier layer so the logits
    have a standard deviation of about 3 on ``x``. Returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 0.1) * 0.3)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None
    model.train()
    torch.manual_seed(seed)
    model(x)
    for b in bns:
        b.momentum = 0.1
    model.eval()
    # the classifier: the last linear layer, or the last convolution where the head is one
    # (SqueezeNet's 1x1 conv); weight and bias scaled together, so the logits scale exactly
    last = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    s = 3.0 / model(x).std()
    last.weight.mul_(s)
    if last.bias is not None:
        last.bias.mul_(s)
    return model
