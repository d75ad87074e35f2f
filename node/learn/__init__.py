"""The node's side of retraining: labels, frozen datasets, training runs.

The node owns the database and the de-identified archive; :mod:`training`
reads frozen manifests only.  Modules:

- :mod:`node.learn.labels`: the append-only label history (set, retract,
  CSV import) keyed by original, de-identified or accession number;
- :mod:`node.learn.history`: the current label of each study, derived at a time;
- :mod:`node.learn.sr_labels`: a radiologist's labelling SR received over DICOM;
- :mod:`node.learn.tensors`: the cache of preprocessed network inputs;
- :mod:`node.learn.datasets`: patient-grouped folds, frozen manifests, the
  locked evaluation set, show and diff;
- :mod:`node.learn.importers`: MosMedData and COV19-CT-DB as labelled material;
- :mod:`node.learn.runs`: training runs, their leases, scheduled slots and the
  child process that trains.

Model aliases and the promotion gate (a candidate goes live only when it beats
the live model on the locked evaluation set) are not built yet.
"""
