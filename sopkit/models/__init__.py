"""The models a user can name on the command line, in the spirit of timm's ``create_model(name)``.

Every model is built from the per-example ``input_shape`` the data set reports (``(40,)`` for
mnist1d, ``(3, 32, 32)`` for CIFAR-10, ...) and a ``num_classes``; it maps a float32 batch
``(N, *input_shape)`` to logits ``(N, num_classes)``. Input sizes are never hard-coded.

Where things live: :mod:`sopkit.models.registry` (:data:`MODELS`, :func:`build_model` and the
``package.module:factory`` form for a user's own model), one module per family
(:mod:`~sopkit.models.dense`, :mod:`~sopkit.models.conv`, :mod:`~sopkit.models.resnet`,
:mod:`~sopkit.models.transformer`) and :mod:`sopkit.models.checks`, which turns everything a user
can get wrong (an input shape a model cannot take, a bad option value) into a
:class:`~sopkit.errors.UserError`, so the CLI can print one paragraph instead of a traceback.
"""

from sopkit.models.dense import mlp
from sopkit.models.registry import MODELS, ModelSpec, build_model
from sopkit.models.transformer import PatchTransformer

__all__ = ["MODELS", "ModelSpec", "PatchTransformer", "build_model", "mlp"]
