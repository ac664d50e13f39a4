"""Configuration shared by both reference apps: the same environment variables as `web`."""

import os

REDIS_URL = os.environ.get("REDIS_URL", "redis://cache:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://admin@db:5432/desafio3")
PORT = int(os.environ.get("PORT", "5000"))
BIND_HOST = os.environ.get("BIND_HOST", "0.0.0.0")


def db_password():
    path = os.environ.get("DATABASE_PASSWORD_FILE") or os.environ.get("POSTGRES_PASSWORD_FILE")
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


DB_PASSWORD = db_password()


def fmt(ts):
    """The seed's `hora_db`: YYYY-MM-DD HH:MM:SS.ffffff."""
    return ts.strftime("%Y-%m-%d %H:%M:%S.%f")
