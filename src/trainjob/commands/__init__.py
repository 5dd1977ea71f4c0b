"""The inspection commands, one module per command group (``trainjob runs``,
``trainjob dataset``). None of them imports TensorFlow."""
