"""Context Parallel's math: token and batch shares, attention across ranks, tensors between processes."""
