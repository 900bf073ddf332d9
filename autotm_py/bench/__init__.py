"""Stage 5: the experiments of the paper and the GPU comparison against peers."""
