"""The data layer: datasets as files, before any TensorFlow.

Owns what a dataset URI holds: safe extraction of archives (``archives``), one image checked
and made readable as Pillow sees it (``images``), class folders found, every file checked,
and the seeded split (``catalog``), a URI turned into a checked catalog and the published
archives (``source``), resumable HTTP downloads (``httpfetch``), dataset uploads
(``upload``), and packed datasets: the record format (``packfmt``), the index
(``packed``), packing itself (``packing``, with ``shardwrite`` in its processes), and
streaming one: each worker's order of an epoch, the bounded buffer, the shards' checks and
a resume's position, as serialized records for the training layer (``stream``).

May import: ``trainjob.errors``, ``trainjob.store``, Pillow and numpy. Never TensorFlow: a bad
dataset fails in a second.
"""
