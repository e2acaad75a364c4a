"""The worker: adapts the RQ queue to the editing engine (`hoppatch.engine`): model cache, heartbeats, progress, artifacts."""
