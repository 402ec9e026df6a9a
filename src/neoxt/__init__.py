"""neoxt: a PyTorch-native successor to GPT-NeoX.

Public entry points: ``neoxt.config.load_config`` and ``neoxt.load_model``.
"""

__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None):
    """Load a neoxt run directory, a ``global_step<N>`` directory or an HF model directory.

    Returns our ``Transformer`` in eval mode. See ``neoxt.checkpoint.loading``.
    """
    from neoxt.checkpoint.loading import load_model as _load_model

    return _load_model(path, device=device, dtype=dtype)
