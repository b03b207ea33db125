"""The JointSeg paper's residual inception block, shared by JointSeg's encoder and
classifier node and by U-Net's ``decoder_block: inception`` ("we use the improved
inception block for UNet")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(
    in_ch: int, out_ch: int, kernel: int | tuple[int, int], stride: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv ("same" padding for odd kernels) + BN (+ ReLU)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, (kh, kw), stride=stride, padding=(kh // 2, kw // 2), bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def spatial_conv(
    in_ch: int, out_ch: int, factorized: bool, n: int = 3, relu: bool = True
) -> nn.Sequential:
    """An n x n conv, or its factorization 1 x n then n x 1 (the classifier node's)."""
    if not factorized:
        return conv_bn(in_ch, out_ch, n, relu=relu)
    return nn.Sequential(conv_bn(in_ch, out_ch, (1, n)), conv_bn(out_ch, out_ch, (n, 1), relu=relu))


class ResidualInception(nn.Module):
    """The paper's residual inception block (``factorized=True``: its Fig. 3 variant)."""

    def __init__(self, in_ch: int, out_ch: int, factorized: bool = False, n: int = 3) -> None:
        super().__init__()
        b = max(out_ch // 4, 1)  # branch width; the concatenation is 4b wide

        def conv(c_in: int, c_out: int) -> nn.Sequential:
            return spatial_conv(c_in, c_out, factorized, n)

        self.branch1 = conv_bn(in_ch, b, 1)
        self.branch3 = nn.Sequential(conv_bn(in_ch, b, 1), conv(b, b))
        self.branch5 = nn.Sequential(conv_bn(in_ch, b, 1), conv(b, b), conv(b, b))
        self.branch_pool = nn.Sequential(conv(in_ch, b), nn.MaxPool2d(3, stride=1, padding=1))
        self.merge = spatial_conv(4 * b, out_ch, factorized, n, relu=False)
        self.residual = conv_bn(in_ch, out_ch, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        cat = torch.cat([branch(x) for branch in branches], 1)
        return F.relu(self.merge(cat) + self.residual(x))
