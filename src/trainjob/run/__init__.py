"""The run layer: one run folder, who owns it, and how a training loop records it.

Owns the run folder's files and publishing (``folder``), the background uploads in
generations (``uploader``), the run lock and its lease (``lock``), the stop signal and its
watchdog (``stop``), save points and resuming (``savepoints``), what a training loop calls
at every batch and epoch (``state``), the fine-tuning phases (``phases``), ``config.json``
(``configfile``), who trains together and where several workers start (``cluster``,
``startpoint``), and one trial of a sweep (``sweep``).

May import: ``trainjob.errors``, ``trainjob.hooks``, ``trainjob.config``,
``trainjob.store`` and ``trainjob.data``. Never TensorFlow: a training loop hands over
functions (write the weights) instead.
"""
