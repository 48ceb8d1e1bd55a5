"""Stable Diffusion I/O: checkpoints (``checkpoint``), the capturing attention
processor (``capture``), bundle export (``export``), the bundle format
(``bundle``) and the model that runs a bundle through the libtorch shim
(``model``)."""
