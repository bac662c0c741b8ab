"""PCT-Net channels per level, defined once. A module of its own (no torch import), so that the console scripts'
argument parsers can show them as defaults without loading torch; ``nnunetv2_vf.architectures.pctnet`` re-exports
them."""

# the paper's network (the authors' pctnet_ct10k_volf.pt)
PAPER_FEATURES = (24, 48, 128, 256, 512)
# the small network of the demo, the tests and CPU runs (PCTNetTrainer_small)
SMALL_FEATURES = (8, 16, 32, 64, 128)
