"""rotmnist_c8_v1: a C8-equivariant convolutional autoencoder for 28x28 digits (escnn).

FROZEN: the weights in model_store/models/rotmnist-c8 were trained with this file. Do not edit it;
a change of architecture is a new file (``arch_rotmnist_c8_v2.py``).

Encoder (the served part), all on regular fields of C8 = ``gspaces.rot2dOnR2(N=8)``::

    1 trivial field, 28x28
    conv 5x5 pad 2 → w1 (each conv but the last: InnerBatchNorm + ReLU)  28x28
    blur-pool 2x → 14; conv 3x3 → w2, conv 3x3 → w2  14x14
    blur-pool 2x → 7;  conv 3x3 → w3                  7x7
    conv 7x7, no padding → C fields                   1x1   → latent [B, C*8], field-major

Every operation commutes exactly with 90-degree rotations of an even grid: odd kernels with
symmetric 'same' padding, a [1,3,3,1]^2 blur with stride 2 and padding 1 (its samples are
symmetric about the centre of an even grid; a strided odd kernel is not), and a final valid 7x7
conv. So rotating the input by 90 degrees (``torch.rot90``) rolls every field by exactly
2 * rotation_shift up to float noise; other angles are equivariant only approximately.

The decoder (training only) mirrors it: transposed 7x7 conv (1→7), nearest 2x upsampling
(7→14→28), 3x3 convs, a final 5x5 conv to one trivial field (logits of the pixel intensities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from escnn import gspaces
from escnn import nn as enn

__all__ = ["ORDER", "RotMNISTAutoencoder", "build_decoder", "build_encoder"]

ORDER = 8
SIZE = 28
# The published configuration: latent fields and the widths (regular fields) of the three stages.
FIELDS = 32
WIDTHS = (8, 16, 24)


class _PlainBlurPool2x(torch.nn.Module):
    """A fixed [1,3,3,1]^2/64 depthwise blur, stride 2, padding 1 (the exported form)."""

    weight: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer(
            "weight", ((k[:, None] * k[None, :]) / 64.0).expand(channels, 1, 4, 4).clone()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, stride=2, padding=1, groups=self.channels)


class _BlurPool2x(enn.EquivariantModule):
    """The blur-pool on escnn field types: the same filter on every channel commutes with the
    permutation action of regular fields."""

    def __init__(self, in_type: enn.FieldType) -> None:
        super().__init__()
        self.in_type = in_type
        self.out_type = in_type
        self.pool = _PlainBlurPool2x(in_type.size)

    def forward(self, x: enn.GeometricTensor) -> enn.GeometricTensor:
        return enn.GeometricTensor(self.pool(x.tensor), self.out_type)

    def evaluate_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        b, c, h, w = input_shape
        return (b, c, h // 2, w // 2)

    def export(self) -> torch.nn.Module:
        self.eval()
        return _PlainBlurPool2x(self.in_type.size).eval()


def _conv_block(gspace: gspaces.GSpace2D, in_type: enn.FieldType, width: int, kernel: int) -> tuple:
    out_type = enn.FieldType(gspace, width * [gspace.regular_repr])
    return (
        enn.R2Conv(in_type, out_type, kernel_size=kernel, padding=kernel // 2),
        enn.InnerBatchNorm(out_type),
        enn.ReLU(out_type, inplace=True),
    ), out_type


def build_encoder(
    fields: int = FIELDS, widths: tuple[int, int, int] = WIDTHS
) -> enn.SequentialModule:
    """The equivariant encoder: [B, 1, 28, 28] → ``fields`` regular C8 fields on a 1x1 map."""
    gspace = gspaces.rot2dOnR2(N=ORDER)
    t = enn.FieldType(gspace, [gspace.trivial_repr])
    layers: list[enn.EquivariantModule] = []
    w1, w2, w3 = widths
    for width, kernel, pool in ((w1, 5, True), (w2, 3, False), (w2, 3, True), (w3, 3, False)):
        block, t = _conv_block(gspace, t, width, kernel)
        layers.extend(block)
        if pool:
            layers.append(_BlurPool2x(t))
    out_type = enn.FieldType(gspace, fields * [gspace.regular_repr])
    layers.append(enn.R2Conv(t, out_type, kernel_size=7, padding=0))
    return enn.SequentialModule(*layers)


def build_decoder(
    fields: int = FIELDS, widths: tuple[int, int, int] = WIDTHS
) -> enn.SequentialModule:
    """The equivariant decoder (training only): latent fields on 1x1 → logits [B, 1, 28, 28]."""
    gspace = gspaces.rot2dOnR2(N=ORDER)
    w1, w2, w3 = widths
    z = enn.FieldType(gspace, fields * [gspace.regular_repr])
    t3 = enn.FieldType(gspace, w3 * [gspace.regular_repr])
    layers: list[enn.EquivariantModule] = [
        enn.R2ConvTransposed(z, t3, kernel_size=7),
        enn.InnerBatchNorm(t3),
        enn.ReLU(t3, inplace=True),
    ]
    block, t = _conv_block(gspace, t3, w2, 3)
    layers.extend(block)
    layers.append(enn.R2Upsampling(t, scale_factor=2, mode="nearest"))
    block, t = _conv_block(gspace, t, w1, 3)
    layers.extend(block)
    layers.append(enn.R2Upsampling(t, scale_factor=2, mode="nearest"))
    layers.append(
        enn.R2Conv(t, enn.FieldType(gspace, [gspace.trivial_repr]), kernel_size=5, padding=2)
    )
    return enn.SequentialModule(*layers)


class _Flattened(torch.nn.Module):
    """Exported encoder: [B, 1, 28, 28] → latent [B, C*8] (field c at channels c*8 .. c*8+7)."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


class RotMNISTAutoencoder(torch.nn.Module):
    """Encoder + decoder.

    1. ``latent(x)``: x [B, 1, 28, 28] float in [0, 1] → [B, C*8] (escnn forward, trainable);
    2. ``forward(x)``: (latent, reconstruction logits [B, 1, 28, 28]);
    3. ``export_encoder()``: the encoder as plain PyTorch in eval mode (no escnn needed to run it).
    """

    def __init__(self, fields: int = FIELDS, widths: tuple[int, int, int] = WIDTHS) -> None:
        super().__init__()
        self.fields = fields
        self.widths = tuple(widths)
        self.encoder = build_encoder(fields, widths)
        self.decoder = build_decoder(fields, widths)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(enn.GeometricTensor(x, self.encoder.in_type)).tensor.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(enn.GeometricTensor(x, self.encoder.in_type))
        return z.tensor.flatten(1), self.decoder(z).tensor

    def export_encoder(self) -> torch.nn.Module:
        self.eval()
        return _Flattened(self.encoder.export()).eval()
