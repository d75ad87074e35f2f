"""Pure stages of the pipeline, each from one frozen record to the next; none touches the database.

- :mod:`node.stages.selection`: which series of a study to analyse, and why;
- :mod:`node.stages.anonymize`: the de-identified archive copy (PS3.15);
- :mod:`node.stages.reports`: the SR, SEG and summary image sent back into the study.

:mod:`node.pipeline` chains them and records state.
"""
