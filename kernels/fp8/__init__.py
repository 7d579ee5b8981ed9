"""FP8 e4m3 linear layers: row-wise quantization, scaled matmuls, Triton kernels, the graph pass into FP8 rows."""
