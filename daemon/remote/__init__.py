"""Scale-out: workers on other machines consume one queue through huey on Redis (issue 14).

transfer.py moves files and folders through Redis itself; redisurl.py parses, masks and connects
queue URLs. Nothing here imports redis at package import time (the CLI start-up path stays light).
"""
