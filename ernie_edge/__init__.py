"""ernie-edge: run ERNIE-4.5-21B-A3B-Thinking offline on a laptop.

    import ernie_edge
    model = ernie_edge.load("path/to/model")      # HF checkpoint folder or converted edge folder
    logits = model.logits([1, 2, 3])               # float32 [T, vocab], full prefill from position 0
"""

from .config import ErnieConfig
from .errors import ErnieEdgeError
from .model import Model, load

__version__ = "0.1.0"
__all__ = ["ErnieConfig", "ErnieEdgeError", "Model", "load", "__version__"]
