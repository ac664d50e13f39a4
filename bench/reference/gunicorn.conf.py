"""gunicorn settings for pooled_app: sync workers, one per core, clients created post-fork."""

import os

from common import BIND_HOST, PORT

bind = f"{BIND_HOST}:{PORT}"
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_class = "sync"
backlog = 2048
accesslog = None
errorlog = "-"
loglevel = "warning"


def post_fork(server, worker):
    import pooled_app

    pooled_app.init_worker()
