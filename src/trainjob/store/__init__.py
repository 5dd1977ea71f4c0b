"""The store layer: object storage and the host's caches.

Owns every byte that goes to or comes from a bucket or the local disk on the job's behalf:
the boto3 client and what its failures mean (``client``), compare-and-swap writes
(``conditional``), the one interface over ``s3://`` and local folders (``base``, ``s3``,
``local``, ``uri``), the download cache of datasets (``fetch``, ``mirror``, ``cacheindex``,
``transfer``), the file locks that let jobs on one host share it (``hostcache``), and file
digests (``digests``).

May import: ``trainjob.errors`` and ``trainjob.hooks``, and third-party libraries (boto3). Nothing
of the job's own layers above it (data, config, run, inspect, train), and never TensorFlow.
"""
