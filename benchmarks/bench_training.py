"""Time per epoch of Half-VAE training, fused against reference ops: see halfvae_ext.bench_training."""
from halfvae_ext.bench_training import main

if __name__ == "__main__":
    main()
