"""Stage 2, ``train.py``: the training settings, planning, sampling, augmentation, the loop and its callbacks,
data-parallel strategies and the data-loader workers. Never imports :mod:`utils.evaluate`."""
