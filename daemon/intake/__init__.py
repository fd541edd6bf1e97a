"""The gate between a user's folder and the queue: validate, snapshot, markers."""
