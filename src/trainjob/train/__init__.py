"""The training layer: the only one that imports TensorFlow and Keras.

Owns the data as tf.data streams behind one seam (``streams``: a scanned dataset's files in
``inputs``, a packed dataset's shards in ``packedinput``) and the per-image ops
(``augment``), the model and
its initial weights (``model``, ``weights``), compiling, fitting and the phases
(``trainer``), the callbacks and RunKeeper,
Keras' side of the run state (``callbacks``), several workers (``collective``,
``steploop``), the final evaluation (``evaluation``), and what a finished run writes
(``exports``, ``plots``, ``eventlog``), ``trainjob predict`` (``predictor``), and the
session that runs these steps in order for ``job.py`` (``session``).

May import: every layer below it (``errors``, ``hooks``, ``config``, ``store``, ``data``,
``run``, ``inspect``). Importing this package imports nothing: each module imports
TensorFlow itself, only when the job gets that far (``weights`` needs none).
"""
