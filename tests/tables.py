"""Parameter tables shared by the model and loss tests and by tests/backend_subset.py (which runs them under another
Keras backend): small but complete networks per architecture, their input sizes, and an option set per loss."""

SMALL_MODELS = {  # every block of each architecture runs
    "unet": {"depth": 2, "filters": 4},
    "resunet": {"depth": 2, "filters": 4},
    "attention_unet": {"depth": 2, "filters": 4},
    "dilated": {"filters": 4, "front_convs": 1, "dilations": (1, 2)},
    "fcn": {"depth": 3, "filters": 4, "convs_per_level": 1},
    "twopath": {"local_filters": 4, "global_filters": 4},
}
SPATIAL = {2: (16, 16), 3: (16, 16, 16)}
LOSS_OPTIONS = {
    "dice": {},
    "gdl": {},
    "dice_ce": {},
    "gdl_ce": {},
    "ce": {},
    "weighted_ce": {"class_weights": [1.0, 5.0, 2.0]},
    "tversky": {"alpha": 0.3, "beta": 0.7},
    "focal": {"gamma": 2.0},
    "dice_focal": {},
}
