"""Generated Triton for fused prologues/epilogues (arrives with the Triton linear kernels)."""
