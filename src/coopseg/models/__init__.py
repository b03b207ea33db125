"""Model construction: one small table from architecture name to class."""

from __future__ import annotations

from typing import Any

from timm.layers import freeze_batch_norm_2d
from torch import nn

from .backbones import PretrainedWeightsError, create_backbone
from .cooperative import CooperativeNet, Link
from .danet import DANet
from .deeplabv3plus import DeepLabV3Plus
from .dfdam import DFDAM
from .fcn import FCN8s
from .jointseg import JointSeg, JointSegEncoder
from .taps import TapInfo, TappedNetwork, run_taps
from .unet import UNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "cooperative": CooperativeNet,
    "danet": DANet,
    "deeplabv3plus": DeepLabV3Plus,
    "dfdam": DFDAM,
    "fcn8s": FCN8s,
    "jointseg": JointSeg,
    "unet": UNet,
}


def create_model(name: str, *, freeze_bn: bool = False, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` (see ``ARCHITECTURES``) as a plain ``nn.Module``.

    ``freeze_bn=True`` turns every batch norm into timm's ``FrozenBatchNorm2d``
    (running statistics, fixed affine), so samples in a batch never interact.
    """
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; available: {sorted(ARCHITECTURES)}"
        ) from None
    model = cls(**kwargs)
    if freeze_bn:
        model = freeze_batch_norm_2d(model)
    # the config section it was built from, for save_pretrained's config.json
    model.coopseg_config = {"arch": name, **kwargs, **({"freeze_bn": True} if freeze_bn else {})}
    return model


__all__ = [
    "ARCHITECTURES",
    "DFDAM",
    "CooperativeNet",
    "DANet",
    "DeepLabV3Plus",
    "FCN8s",
    "JointSeg",
    "JointSegEncoder",
    "Link",
    "PretrainedWeightsError",
    "TapInfo",
    "TappedNetwork",
    "UNet",
    "create_backbone",
    "create_model",
    "run_taps",
]
