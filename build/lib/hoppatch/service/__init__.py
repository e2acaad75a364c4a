"""The HTTP API: adapts HTTP to the job queue. Never imports torch or the workers."""
