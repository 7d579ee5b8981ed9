"""Compilation: regional torch.compile with counted graphs, inductor heuristics, CUDA-graph capture and replay."""
