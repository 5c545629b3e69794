"""Settings of the end-to-end test app.

OBSERVER_TEST_DJANGO_PROMETHEUS=1 installs django-prometheus (middlewares, the /metrics
view, its PostgreSQL engine and model mixin), for side-by-side runs; without it the app
has no instrumentation at all.

OBSERVER_TEST_PG (JSON: host (an address, or a Unix socket directory), port, name, user,
password, and optionally conn_max_age, server_side_binding, pool, closed_port,
export_migrations, failing_aliases) gives it a PostgreSQL database, with two extra
aliases that cannot connect (unless failing_aliases is false): "broken" (a closed port,
or a missing Unix socket) and "wrongpw" (a user with a wrong password).
"""
import json
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "observer-test-app-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "testproj.urls"
WSGI_APPLICATION = "testproj.wsgi.application"
USE_TZ = True
DJANGO_PROMETHEUS = os.environ.get("OBSERVER_TEST_DJANGO_PROMETHEUS") == "1"
DATABASES = {}
_pg = os.environ.get("OBSERVER_TEST_PG")
if _pg:
    _pg = json.loads(_pg)
    if _pg.get("driver") == "psycopg2":
        import sys

        # Django's backend imports psycopg 3 first and falls back to psycopg2.
        sys.modules["psycopg"] = None
    _engine = "django_prometheus.db.backends.postgresql" if DJANGO_PROMETHEUS else "django.db.backends.postgresql"
    _options = {}
    if _pg.get("server_side_binding"):
        _options["server_side_binding"] = True
    if _pg.get("pool"):
        _options["pool"] = {"min_size": 1, "max_size": 4}
    # libpq's TLS: sslmode (prefer, require, verify-full) and the CA for verify-*.
    for _k in ("sslmode", "sslrootcert"):
        if _pg.get(_k):
            _options[_k] = _pg[_k]
    _base = {
        "ENGINE": _engine,
        "NAME": _pg["name"],
        "USER": _pg["user"],
        "PASSWORD": _pg["password"],
        "HOST": _pg["host"],
        "PORT": str(_pg["port"]),
        "CONN_MAX_AGE": _pg.get("conn_max_age", 0),
        "OPTIONS": _options,
    }
    DATABASES = {"default": _base}
    if _pg.get("failing_aliases", True):
        if _pg["host"].startswith("/"):
            _broken = {"HOST": _pg["host"] + "/missing"}
        else:
            _broken = {"HOST": "127.0.0.1", "PORT": str(_pg.get("closed_port", 9))}
        DATABASES["broken"] = {**_base, **_broken, "OPTIONS": {}}
        # Another user, so that its connections can be told from "default"'s.
        DATABASES["wrongpw"] = {
            **_base,
            "USER": _pg["user"] + "_wrongpw",
            "PASSWORD": "not-the-password",
            "OPTIONS": {},
        }
    PROMETHEUS_EXPORT_MIGRATIONS = bool(_pg.get("export_migrations"))
# OBSERVER_TEST_SQLITE (JSON: name = a database file, conn_max_age, and optionally
# timeout = how long a write waits for a lock, notadb = a file that is not a database)
# makes "default" a SQLite database, "broken" one in a directory that does not exist,
# "memory" an in-memory one, and "notadb" one on the given file.
_lite = os.environ.get("OBSERVER_TEST_SQLITE")
if _lite:
    _lite = json.loads(_lite)
    _engine = "django_prometheus.db.backends.sqlite3" if DJANGO_PROMETHEUS else "django.db.backends.sqlite3"
    _base = {"ENGINE": _engine, "NAME": _lite["name"], "CONN_MAX_AGE": _lite.get("conn_max_age", 0)}
    if "timeout" in _lite:
        _base["OPTIONS"] = {"timeout": _lite["timeout"]}
    DATABASES = {
        "default": _base,
        "broken": {**_base, "NAME": "/nonexistent-observer-dir/broken.sqlite3"},
        "memory": {**_base, "NAME": ":memory:"},
    }
    if "notadb" in _lite:
        DATABASES["notadb"] = {**_base, "NAME": _lite["notadb"]}
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# OBSERVER_TEST_CACHE (JSON: kind = django_redis | native_redis | pymemcache, location,
# down = a location nothing listens on, and optionally protocol (RESP 2 or 3),
# ignore_exceptions, key_prefix) gives it a "default" cache and a "down" one.
_cache = os.environ.get("OBSERVER_TEST_CACHE")
if _cache:
    _cache = json.loads(_cache)
    _kind = _cache["kind"]
    _backend = {
        ("django_redis", False): "django_redis.cache.RedisCache",
        ("django_redis", True): "django_prometheus.cache.backends.redis.RedisCache",
        ("native_redis", False): "django.core.cache.backends.redis.RedisCache",
        ("native_redis", True): "django_prometheus.cache.backends.redis.NativeRedisCache",
        ("pymemcache", False): "django.core.cache.backends.memcached.PyMemcacheCache",
        ("pymemcache", True): "django_prometheus.cache.backends.memcached.PyMemcacheCache",
    }[(_kind, DJANGO_PROMETHEUS)]
    if _kind == "django_redis":
        _pool = {"protocol": _cache.get("protocol", 2)}
        _options = {
            "IGNORE_EXCEPTIONS": bool(_cache.get("ignore_exceptions")),
            "CONNECTION_POOL_KWARGS": _pool,
            "SOCKET_CONNECT_TIMEOUT": 2,
            "SOCKET_TIMEOUT": 2,
        }
    elif _kind == "native_redis":
        _options = {"protocol": _cache.get("protocol", 2), "socket_connect_timeout": 2, "socket_timeout": 2}
    else:
        _options = {"connect_timeout": 2, "timeout": 2}
    CACHES = {
        alias: {
            "BACKEND": _backend,
            "LOCATION": _cache[where],
            "KEY_PREFIX": _cache.get("key_prefix", ""),
            "OPTIONS": _options,
        }
        for alias, where in (("default", "location"), ("down", "down"))
    }

INSTALLED_APPS = ["django.contrib.contenttypes", "shop"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": False,
    }
]
LOGGING = {"version": 1, "disable_existing_loggers": False}

if DJANGO_PROMETHEUS:
    INSTALLED_APPS.append("django_prometheus")
    MIDDLEWARE = (
        ["django_prometheus.middleware.PrometheusBeforeMiddleware"]
        + MIDDLEWARE
        + ["django_prometheus.middleware.PrometheusAfterMiddleware"]
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
