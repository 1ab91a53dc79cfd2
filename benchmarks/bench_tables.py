"""Latent-table optimizer steps against N: see halfvae_ext.bench_tables."""
from halfvae_ext.bench_tables import main

if __name__ == "__main__":
    main()
