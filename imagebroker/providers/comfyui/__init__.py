"""ComfyUI, the canvas rung: the provider (`provider.py`), graphs and answers as pure functions (`graph.py`)
and the server pool (`pool.py`)."""

from .graph import build_graph, infer_bindings, node_errors_text
from .provider import ComfyUIProvider

__all__ = ["ComfyUIProvider", "build_graph", "infer_bindings", "node_errors_text"]
