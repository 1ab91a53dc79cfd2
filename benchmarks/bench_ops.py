"""Fused ops against eager PyTorch, torch.distributions and torch.compile: see halfvae_ext.bench_ops."""
from halfvae_ext.bench_ops import main

if __name__ == "__main__":
    main()
