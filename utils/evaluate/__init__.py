"""Stage 3, ``evaluation.py``: prediction of prepared or new images, post-processing, scoring, pictures and the
HTML report. Never imports :mod:`utils.train`; a run is loaded through :mod:`utils.runs`."""
