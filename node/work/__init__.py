"""The work the node tracks: study states, analysis jobs, the outbox and their views.

- :mod:`node.work.state`: the study, job and delivery state tables and their one transition function;
- :mod:`node.work.claim`: locking the rows a worker claims (jobs and deliveries alike);
- :mod:`node.work.jobs`: queueing stable studies and claiming analysis jobs;
- :mod:`node.work.outbox`: delivering result objects, retried until acknowledged;
- :mod:`node.work.views`: read-only rows for the command line and the web page.
"""
