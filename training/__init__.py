"""Training for X-NeMo: the paper's three-stage recipe (plus a VAE stage for from-scratch sizes).

Every network comes from `xnemo_core`; this package adds data, augmentation, losses, the GAN head,
the per-stage trainable sets, resumable checkpoints and the entry point
`python -m training.train --config FILE [--max-steps N] [--output DIR] [--resume]`.
"""
