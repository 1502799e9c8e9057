"""The report: what a job measures of its result and shows (held-out quality, perplexity, the size-error frontier,
latency in llama.cpp, the written bytes by kind of tensor)."""
