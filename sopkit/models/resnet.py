"""torchvision ResNets (random weights) with a stem sized for the data set's images.

torchvision is imported when a ResNet is built, not when this module is imported: importing it
takes seconds, and ``import sopkit.models`` must stay cheap.
"""

from __future__ import annotations

from torch import nn

from sopkit.errors import UserError
from sopkit.models.checks import shape_error

__all__ = ["resnet18", "resnet50"]


def _resnet(
    arch: str, input_shape: tuple[int, ...], num_classes: int, small_input_stem: bool | None
) -> nn.Module:
    """A torchvision ResNet (random weights) whose stem fits the data set's images.

    ``small_input_stem`` (default: on when the image is at most 64 px) swaps the 7x7 stride-2
    conv and the max-pool for a 3x3 stride-1 conv, the usual CIFAR stem; otherwise the ImageNet
    stem is kept and the state_dict stays loadable into ``torchvision.models.<arch>``.
    """
    if len(input_shape) != 3:
        raise shape_error(arch, input_shape, "images shaped (C, H, W), e.g. (3, 32, 32)")
    if small_input_stem is not None and not isinstance(small_input_stem, bool):
        raise UserError(
            f"Option 'small_input_stem' of model {arch!r} must be true, false or unset, "
            f"got {small_input_stem!r}."
        )
    # Imported here, not at module level: importing torchvision costs seconds.
    import torchvision.models

    channels, height, width = input_shape
    if small_input_stem is None:
        small_input_stem = max(height, width) <= 64
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    conv1: nn.Conv2d = model.conv1
    if small_input_stem:
        model.conv1 = nn.Conv2d(channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != conv1.in_channels:
        model.conv1 = nn.Conv2d(channels, conv1.out_channels, 7, stride=2, padding=3, bias=False)
    if model.conv1 is not conv1:
        # Same initialisation torchvision gives its convolutions, so only the shape differs.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet18(
    *, input_shape: tuple[int, ...], num_classes: int, small_input_stem: bool | None = None
) -> nn.Module:
    """torchvision ResNet-18, see :func:`_resnet`."""
    return _resnet("resnet18", input_shape, num_classes, small_input_stem)


def resnet50(
    *, input_shape: tuple[int, ...], num_classes: int, small_input_stem: bool | None = None
) -> nn.Module:
    """torchvision ResNet-50, see :func:`_resnet`."""
    return _resnet("resnet50", input_shape, num_classes, small_input_stem)
