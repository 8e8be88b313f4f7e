"""Small convolutional classifiers: ``cnn1d`` for signals and ``cnn2d`` for images."""

from __future__ import annotations

from torch import nn

from sopkit.models.checks import positive_int, shape_error

__all__ = ["cnn1d", "cnn2d"]


def cnn1d(*, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A small 1-D CNN for signals such as mnist1d: three Conv1d+BN+ReLU blocks, average pool.

    A 1-D input ``(L,)`` is read as one channel; ``(C, L)`` as C channels. ``width`` is the
    channel count of the first block (the later blocks use twice as many).
    """
    width = positive_int("cnn1d", "width", width)
    if len(input_shape) == 1:
        channels, length = 1, input_shape[0]
        # Give the flat signal its channel axis inside the model so the data need no reshaping.
        layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    elif len(input_shape) == 2:
        channels, layers = input_shape[0], []
    else:
        raise shape_error("cnn1d", input_shape, "1-D signals shaped (L,) or (C, L)")
    widths = (width, 2 * width, 2 * width)
    for i, out_channels in enumerate(widths):
        # Stride 2 after the first block halves the length: cheap on CPU, wider receptive field.
        # Padding 2 with kernel 5 keeps even a length-1 signal valid.
        stride = 1 if i == 0 else 2
        layers += [
            nn.Conv1d(channels, out_channels, kernel_size=5, stride=stride, padding=2, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(),
        ]
        channels = out_channels
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def cnn2d(*, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A small 2-D CNN for 32x32-ish images (C, H, W): three Conv2d+BN+ReLU blocks, average pool.

    The first two blocks max-pool by 2. ``width`` is the channel count of the first block
    (then 2x and 4x).
    """
    width = positive_int("cnn2d", "width", width)
    if len(input_shape) != 3:
        raise shape_error("cnn2d", input_shape, "images shaped (C, H, W), e.g. (3, 32, 32)")
    channels = input_shape[0]
    layers: list[nn.Module] = []
    for i, out_channels in enumerate((width, 2 * width, 4 * width)):
        layers += [
            nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        if i < 2:
            # ceil_mode keeps odd and tiny images valid (a 1x1 map pools to 1x1, not 0x0).
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
