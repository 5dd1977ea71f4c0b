"""The command groups besides ``train``, one module per group: ``trainjob runs`` (runs),
``trainjob dataset`` (dataset; ``dataset pack`` in datasetpack), ``trainjob predict``
(predict). They parse options and print; the work lives in the layers below. None of them
imports TensorFlow at import time.

May import: every layer below (``errors``, ``hooks``, ``store``, ``data``, ``config``,
``run``, ``inspect``, and ``train`` inside a command that needs it), and click.
"""
