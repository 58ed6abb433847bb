"""Model zoo, feature taps and profiling.

``create(name, num_classes=10, in_channels=3, input_size=None, **kwargs)`` builds a registered
model; ``list_models()`` names them. Every model's ``forward(x)`` returns logits; read inner
features with ``FeatureTap(model, ["stage3", "pool"])`` using the logical names in
``model.feature_points``. See docs/models.md.

Layering: this package imports nothing from kdforge except ``kdforge.core`` (registry, plugins, errors).
"""

from kdforge.core.plugins import import_submodules

import_submodules(__name__, __path__)  # every model file registers itself; a new file needs no edit here

from kdforge.models import cifar_resnet, mobilenetv2, nonn, shufflenet, small, vgg, wide_resnet  # noqa: E402, F401
from kdforge.models.factory import MODELS, accepted_arguments, create, list_models  # noqa: E402
from kdforge.models.profile import (  # noqa: E402
    count_flops,
    count_macs,
    count_parameters,
    measure_latency,
    profile_model,
)
from kdforge.models.taps import FeatureTap, module_names  # noqa: E402

__all__ = [
    "MODELS",
    "FeatureTap",
    "accepted_arguments",
    "cifar_resnet",
    "count_flops",
    "count_macs",
    "count_parameters",
    "create",
    "list_models",
    "measure_latency",
    "mobilenetv2",
    "module_names",
    "profile_model",
    "shufflenet",
    "small",
    "vgg",
    "wide_resnet",
]
