"""The serving engine: sequences, the block manager (paged KV cache with prefix caching), the
scheduler (continuous batching, chunked prefill, preemption), the model runner and the step loop."""
