"""HTTP service (FastAPI) over the pipeline. It depends on the numeric packages; they never import it."""
