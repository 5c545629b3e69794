"""Views that drive a known set of cache operations (OBSERVER_TEST_CACHE must be set).

Each answers with what the cache API returned, so tests can check the app saw what
they expect."""
import itertools
import os

from django.core.cache import cache, caches
from django.http import HttpResponse

_n = itertools.count()


def _fresh(prefix):
    return "%s-%d-%d" % (prefix, os.getpid(), next(_n))


def hit(_):
    cache.set("hit-key", "value")
    return cache.get("hit-key")  # 1 get, a hit


def miss(_):
    return cache.get(_fresh("missing"))  # 1 get, a miss


def get_or_set(_):
    # A miss, the add, then a hit: 2 gets.
    return cache.get_or_set(_fresh("gos"), "made")


def get_many(_):
    cache.set("many-a", 1)
    return cache.get_many(["many-a", _fresh("many-b")])  # not a get (MGET / multi-key get)


def has_key(_):
    cache.set("has-key", "x")
    # Redis: EXISTS, not a get; memcached: Django's has_key is a get (a hit).
    return (cache.has_key("has-key"), cache.has_key(_fresh("has-not")))


def set_delete(_):
    k = _fresh("sd")
    cache.set(k, "x")
    cache.delete(k)
    return cache.get(k)  # a miss


def integer(_):
    cache.set("int-key", 42)
    return cache.get("int-key")  # a hit (stored raw)


def none(_):
    cache.set("none-key", None)
    return cache.get("none-key", "default")  # a stored None reads as a miss


def big(_):
    cache.set("big-key", "x" * 200_000)
    return len(cache.get("big-key"))  # a hit, larger than any capture


def down(_):
    try:
        return caches["down"].get("k")  # fails (IGNORE_EXCEPTIONS: returns None)
    except Exception as e:
        return type(e).__name__


def main_down(_):
    try:
        return cache.get("hit-key")
    except Exception as e:
        return type(e).__name__


def foreign(_):
    # Another user of the same server (Celery results, a raw client): no Django cache get.
    from django.conf import settings

    default = settings.CACHES["default"]
    if "memcache" in default["BACKEND"].lower():
        from pymemcache.client.base import Client

        host, port = default["LOCATION"].rsplit(":", 1)
        client = Client((host, int(port)))
        try:
            return client.get("celery-task-meta-1")
        finally:
            client.close()
    import redis

    client = redis.Redis.from_url(default["LOCATION"])
    try:
        return client.get("celery-task-meta-1")
    finally:
        client.close()


OPS = {
    "hit": hit,
    "miss": miss,
    "get_or_set": get_or_set,
    "get_many": get_many,
    "has_key": has_key,
    "set_delete": set_delete,
    "integer": integer,
    "none": none,
    "big": big,
    "down": down,
    "main_down": main_down,
    "foreign": foreign,
}


def run(request, op):
    return HttpResponse("%r\n" % (OPS[op](request),))
