"""The same app, deployed as a careful Flask user would: under gunicorn sync workers, one per
core, with one Redis client and one pooled, reused psycopg2 connection per worker process.
gunicorn (without --preload) imports this module in each worker after the fork, so no
connection is ever shared across a fork.

Run: gunicorn -w <cores> -b 127.0.0.1:5000 pooled_app:app
"""

import psycopg2
import psycopg2.pool
import redis
from flask import Flask, jsonify

from common import DATABASE_URL, DB_PASSWORD, REDIS_URL, fmt

app = Flask(__name__)
app.json.sort_keys = False

cache = redis.Redis.from_url(REDIS_URL)
pool = psycopg2.pool.SimpleConnectionPool(1, 1, DATABASE_URL, password=DB_PASSWORD)


@app.route("/")
def index():
    visitas = cache.incr("visitas")
    conn = pool.getconn()
    broken = False
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
    return jsonify(status="ok", visitas_cache=str(visitas), hora_db=fmt(hora))
