"""ernie_edge.quant: the offline converter and THE on-disk quantization format (formats.py)."""
