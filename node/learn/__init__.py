"""Labels, frozen dataset manifests, model aliases and the promotion gate (retraining).

The room for the node's side of retraining (see the shared design): the node
owns the database and the archive, writes frozen manifests for ``training``,
records training runs and moves model aliases.  Nothing lives here yet.
"""
