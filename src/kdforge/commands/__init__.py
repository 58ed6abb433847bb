"""The top layer's command code: what ``kdforge export``, ``kdforge profile``, ``kdforge nonn-partition``
and ``kdforge serve-nonn`` do, on top of the library below (``kdforge.cli`` only parses arguments
and calls these).

* :mod:`kdforge.commands.export`: a model file -> ONNX (optionally int8) or TorchScript;
* :mod:`kdforge.commands.profile`: the compression report of a zoo name or a model file;
* :mod:`kdforge.commands.nonn`: partition a teacher for NoNN students; serve a NoNN system.

Nothing is imported here: ``kdforge --help`` must stay fast.
"""
