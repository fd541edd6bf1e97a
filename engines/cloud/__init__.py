"""What every paid cloud engine shares (fal first; Replicate later): the submission records that
keep money spent at most once per attempt (`submission.py`), the bounded download
(`download.py`) and the endpoint-schema checks (`schema.py`). A cloud engine adds an endpoint
table and a client adapter."""
