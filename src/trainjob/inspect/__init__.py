"""The inspection layer: what a run folder or a dataset says, for people.

Owns run summaries (``runinfo``), runs side by side (``runcompare``), a run's download
checked against its manifest (``rundownload``), a dataset's report (``datasetreport``), and
text tables (``textfmt``).

May import: ``trainjob.errors``, ``trainjob.store``, ``trainjob.data`` and
``trainjob.run``'s file names and readers. Never TensorFlow or Keras, and matplotlib only
inside ``runcompare``'s picture: these commands answer in a second.
"""
