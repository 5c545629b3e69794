# Discovery: the app's URL resolver, the settings that change what django-prometheus
# reports, its databases, its caches and its models' tables. Follows common.py.


def main():
    django = setup()
    from django.conf import settings
    from django.urls import URLPattern, URLResolver, get_resolver
    from django.urls.resolvers import LocalePrefixPattern, ResolverMatch, RoutePattern

    def segment(pattern, endpoint):
        if isinstance(pattern, RoutePattern):
            kind = "route"
        elif isinstance(pattern, LocalePrefixPattern):
            kind = "locale"
        else:
            kind = "regex"
        return {"kind": kind, "regex": pattern.regex.pattern, "endpoint": endpoint}

    routes = []

    def walk(resolver, segments, namespaces, app_names, depth):
        if depth > 32:
            return
        for p in resolver.url_patterns:
            if isinstance(p, URLPattern):
                # Django's own view_name rule (ResolverMatch.__init__).
                m = ResolverMatch(p.callback, (), {}, p.name, app_names, namespaces)
                routes.append({"view": m.view_name, "segments": segments + [segment(p.pattern, True)]})
            elif isinstance(p, URLResolver):
                walk(
                    p,
                    segments + [segment(p.pattern, False)],
                    namespaces + [p.namespace],
                    app_names + [p.app_name],
                    depth + 1,
                )

    walk(get_resolver(), [], [], [], 0)
    return {
        "django": django.get_version(),
        "settings": {
            "APPEND_SLASH": bool(settings.APPEND_SLASH),
            "DEFAULT_CHARSET": str(settings.DEFAULT_CHARSET),
            "SECURE_PROXY_SSL_HEADER": list(settings.SECURE_PROXY_SSL_HEADER)
            if settings.SECURE_PROXY_SSL_HEADER
            else None,
        },
        "routes": routes,
        "databases": databases(settings),
        "caches": caches(settings),
        "models": models(),
    }


def databases(settings):
    """Where each DATABASES alias connects (never its password)."""
    from django.db import connections

    out = []
    for alias, s in settings.DATABASES.items():
        try:
            vendor = connections[alias].vendor
        except Exception:
            vendor = None
        options = s.get("OPTIONS") or {}
        out.append(
            {
                "alias": alias,
                "vendor": vendor,
                "engine": s.get("ENGINE"),
                "name": s.get("NAME") or options.get("dbname"),
                "user": s.get("USER") or options.get("user"),
                "host": s.get("HOST") or options.get("host"),
                "port": str(s.get("PORT") or options.get("port") or ""),
                "pool": bool(options.get("pool")),
            }
        )
    return out


# The backend classes django-prometheus wraps, by the `backend` label it gives them.
CACHE_KINDS = (
    ("django_redis.cache.RedisCache", "redis"),
    ("django.core.cache.backends.redis.RedisCache", "native_redis"),
    ("django.core.cache.backends.memcached.BaseMemcachedCache", "memcached"),
    ("django.core.cache.backends.locmem.LocMemCache", "locmem"),
    ("django.core.cache.backends.filebased.FileBasedCache", "filebased"),
)
MARK = "OBSERVERKEY"


def server(location):
    """A LOCATION entry without credentials or options (only a Redis URL's db)."""
    from urllib.parse import parse_qs, urlsplit, urlunsplit

    location = location.strip()
    if "://" not in location:
        return location
    u = urlsplit(location)
    host = u.hostname or ""
    try:
        port = u.port
    except ValueError:
        port = None
    netloc = ("[%s]" % host if ":" in host else host) + (":%d" % port if port else "")
    db = parse_qs(u.query).get("db")
    return urlunsplit((u.scheme, netloc, u.path, "db=%s" % db[0] if db else "", ""))


def caches(settings):
    """Each CACHES alias: the backend kind, its servers (never credentials), and the
    shape of its keys, read from its own make_key (the key function may be custom)."""
    from django.core.cache import caches as handler

    out = []
    for alias, c in getattr(settings, "CACHES", {}).items():
        kind = None
        try:
            cache = handler[alias]
            mro = ["%s.%s" % (k.__module__, k.__qualname__) for k in type(cache).__mro__]
            kind = next((label for name, label in CACHE_KINDS if name in mro), None)
        except Exception:
            cache = None
        location = c.get("LOCATION") or ""
        if isinstance(location, str):
            location = re.split("[;,]", location)
        # A key is <head><version><tail><key> for Django's default key function.
        head = tail = None
        try:
            a, b = cache.make_key(MARK, version=424242), cache.make_key(MARK, version=535353)
            if a.endswith(MARK) and a.count("424242") == 1 and a.replace("424242", "535353") == b:
                head, tail = a[: -len(MARK)].split("424242")
        except Exception:
            pass
        out.append(
            {
                "alias": alias,
                "backend": c.get("BACKEND"),
                "kind": kind,
                "servers": [server(x) for x in location if isinstance(x, str) and x.strip()],
                "key_head": head,
                "key_tail": tail,
            }
        )
    return out


def models():
    """Table -> model name, and the name given to django-prometheus's model mixin."""
    from django.apps import apps

    out = []
    for m in apps.get_models(include_auto_created=True):
        mixin = None
        for k in type.mro(m):
            found = re.fullmatch(r"ExportModelOperationsMixin\('(.*)'\)", getattr(k, "__qualname__", ""))
            if found:
                mixin = found.group(1)
                break
        out.append({"table": m._meta.db_table, "model": m._meta.model_name, "mixin": mixin})
    return out


run(main, "OBSERVER-DISCOVERY ")
