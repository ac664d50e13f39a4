"""The seed's app, as the seed describes it.

Flask's development server (threaded, the default), one redis-py client at module level,
`INCR visitas` per request, a NEW psycopg2 connection per request for `SELECT NOW()`, and the
JSON page {"status": "ok", "visitas_cache": "<n>", "hora_db": "<time>"}.

Run: python seed_app.py   (PORT, REDIS_URL, DATABASE_URL, DATABASE_PASSWORD_FILE from the env)
"""

import psycopg2
import redis
from flask import Flask, jsonify

from common import BIND_HOST, DATABASE_URL, DB_PASSWORD, PORT, REDIS_URL, fmt

app = Flask(__name__)
app.json.sort_keys = False  # keep status, visitas_cache, hora_db in that order

cache = redis.Redis.from_url(REDIS_URL)


def get_db_connection():
    return psycopg2.connect(DATABASE_URL, password=DB_PASSWORD)


@app.route("/")
def index():
    visitas = cache.incr("visitas")
    conn = get_db_connection()
    try:
        cur = conn.cursor()
        cur.execute("SELECT NOW();")
        hora = cur.fetchone()[0]
        cur.close()
    finally:
        conn.close()
    return jsonify(status="ok", visitas_cache=str(visitas), hora_db=fmt(hora))


if __name__ == "__main__":
    app.run(host=BIND_HOST, port=PORT)
