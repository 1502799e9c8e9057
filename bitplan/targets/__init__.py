"""The targets: what a job writes (the packed artifact and its typed manifest), transformers' loading of that
folder after ``import bitplan``, and the exports to the formats other runtimes load (``targets.exports``)."""
