"""The bottom layer: what every other part of kdforge may use, and which uses nothing of kdforge.

* :mod:`kdforge.core.errors`: the errors meant for people (one line: the problem and the fix);
* :mod:`kdforge.core.registry`: the name -> factory registry of models, methods and datasets;
* :mod:`kdforge.core.schedules`: values that change with training progress;
* :mod:`kdforge.core.checkpoint`: checkpoint and model files, written atomically;
* :mod:`kdforge.core.validation`: pydantic errors turned into one-line messages.

Nothing is imported here, so ``import kdforge.core.errors`` stays cheap (the CLI starts with it).
"""
