"""Conditional generative models and the processing of their samples (data-side distillation).

* :mod:`~kdforge.generative.networks` -- class-conditional and continuous-label generators and
  projection discriminators with spectral normalisation, for 28x28 and 32x32 images;
* :mod:`~kdforge.generative.losses` -- hinge loss, CcGAN's vicinal label sampling (HVDL / SVDL), the
  Fréchet distance used by the quality proxy;
* :mod:`~kdforge.generative.ema` -- the moving average of the generator's weights;
* :mod:`~kdforge.generative.processing` -- density-ratio / confidence subsampling, teacher-loss
  filtering and relabelling (cGAN-KD);
* :mod:`~kdforge.generative.images` -- sample grids as PNG files.

Training runs and the generation step live in :mod:`kdforge.engine.gan` and
:mod:`kdforge.engine.generate`.
"""

from kdforge.generative.ema import EMA
from kdforge.generative.losses import (
    frechet_distance,
    hinge_discriminator_loss,
    hinge_generator_loss,
    sample_vicinal_batch,
    vicinity_weights,
)
from kdforge.generative.networks import ConditionalGenerator, LabelEmbedding, ProjectionDiscriminator

__all__ = [
    "EMA",
    "ConditionalGenerator",
    "LabelEmbedding",
    "ProjectionDiscriminator",
    "frechet_distance",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "sample_vicinal_batch",
    "vicinity_weights",
]
