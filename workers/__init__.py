"""GPU workers: the editing engine (`workers.engine`) and its adapter to the RQ queue."""
