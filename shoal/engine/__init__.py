"""Running requests through a model: today the simple one-request loop; the serving engine
(scheduler, paged block manager, continuous batching) grows here."""
