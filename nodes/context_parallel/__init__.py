"""Context Parallel's ComfyUI glue: the node (rank 0), the pool of worker processes, the sharded forward
every rank runs, the messages between ranks and the workers' side."""
