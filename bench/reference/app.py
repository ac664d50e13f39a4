"""The seed's app, for comparison (bench/README.md), in two deployments:

- `python app.py`: as the seed describes it. Flask's development server (threaded, the
  default), one redis-py client at module level, `INCR visitas` per request, a NEW psycopg2
  connection per request for `SELECT NOW()`;
- `gunicorn -w <cores> app:pooled`: as a careful Flask user deploys it. Sync workers, one per
  core, each with one Redis client and one pooled, reused psycopg2 connection, made on its
  first request, so never shared across gunicorn's fork.

Both answer {"status": "ok", "visitas_cache": "<n>", "hora_db": "<time>"} and read the same
environment variables as `web`: PORT, BIND_HOST, REDIS_URL, DATABASE_URL, DATABASE_PASSWORD_FILE.
"""

import os

import psycopg2
import psycopg2.pool
import redis
from flask import Flask, jsonify

DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://admin@db:5432/desafio3")
PASSWORD_FILE = os.environ.get("DATABASE_PASSWORD_FILE")
PASSWORD = open(PASSWORD_FILE, encoding="utf-8").read().strip() if PASSWORD_FILE else None
cache = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://cache:6379/0"))
pool = None  # the pooled app's, one per gunicorn worker


def answer(visitas, hora):  # the seed's page; its `hora_db` is YYYY-MM-DD HH:MM:SS.ffffff
    return jsonify(status="ok", visitas_cache=str(visitas), hora_db=hora.strftime("%Y-%m-%d %H:%M:%S.%f"))


seed, pooled = Flask("seed"), Flask("pooled")
seed.json.sort_keys = pooled.json.sort_keys = False  # keep status, visitas_cache, hora_db in that order


@seed.route("/")
def seed_index():
    visitas = cache.incr("visitas")
    conn = psycopg2.connect(DATABASE_URL, password=PASSWORD)
    try:
        cur = conn.cursor()
        cur.execute("SELECT NOW();")
        hora = cur.fetchone()[0]
        cur.close()
    finally:
        conn.close()
    return answer(visitas, hora)


@pooled.route("/")
def pooled_index():
    global pool
    visitas = cache.incr("visitas")
    pool = pool or psycopg2.pool.SimpleConnectionPool(1, 1, DATABASE_URL, password=PASSWORD)
    conn, broken = pool.getconn(), False
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT NOW();")
            hora = cur.fetchone()[0]
    except psycopg2.Error:
        broken = True
        raise
    finally:
        pool.putconn(conn, close=broken or conn.closed != 0)
    return answer(visitas, hora)


if __name__ == "__main__":
    seed.run(host=os.environ.get("BIND_HOST", "0.0.0.0"), port=int(os.environ.get("PORT", "5000")))
