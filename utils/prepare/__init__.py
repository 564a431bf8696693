"""Stage 1, ``data_gen.py``: the dataset fingerprint, preparing every case, splits, and the slice and patch exports.

The per-case transform and its inverse live in :mod:`utils.preprocessing` (evaluation replays them), and the prepared
dataset is read back through :mod:`utils.prepared`.
"""
