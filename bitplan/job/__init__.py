"""The job: the pipeline's steps strung together (calibrate, measure sensitivity, size and allocate the bits,
quantize, refine, write the targets), in memory (``pipeline``) or streamed block by block (``streamed_job``)."""
