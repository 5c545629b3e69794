# Run by the observer with the target app's own interpreter, environment, working
# directory, user and mount namespace: loads the app's Django settings, walks its URL
# resolver, and prints one line "OBSERVER-DISCOVERY <json>" (the app may print too).
# It changes nothing in the app and writes no files (python -B).
import json
import os
import re
import sys


def find_settings(argv, cwd):
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        return
    # gunicorn/uvicorn/daphne/hypercorn: "project.wsgi:application" sets it on import.
    for a in argv:
        mod = a.split(":")[0]
        if re.fullmatch(r"[A-Za-z_][\w.]*\.(wsgi|asgi)", mod):
            try:
                __import__(mod)
            except Exception:
                pass
            if os.environ.get("DJANGO_SETTINGS_MODULE"):
                return
    # manage.py runserver: manage.py sets it with os.environ.setdefault(...).
    for a in argv:
        if a.endswith("manage.py"):
            path = a if os.path.isabs(a) else os.path.join(cwd, a)
            with open(path) as f:
                m = re.search(r"DJANGO_SETTINGS_MODULE['\"]\s*,\s*['\"]([\w.]+)['\"]", f.read())
            if m:
                os.environ["DJANGO_SETTINGS_MODULE"] = m.group(1)
                return


def main():
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    argv = json.loads(os.environ.pop("OBSERVER_TARGET_ARGV", "[]"))
    find_settings(argv, cwd)

    import django

    django.setup()
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
    out = {
        "django": django.get_version(),
        "settings": {
            "APPEND_SLASH": bool(settings.APPEND_SLASH),
            "DEFAULT_CHARSET": str(settings.DEFAULT_CHARSET),
            "SECURE_PROXY_SSL_HEADER": list(settings.SECURE_PROXY_SSL_HEADER)
            if settings.SECURE_PROXY_SSL_HEADER
            else None,
        },
        "routes": routes,
    }
    sys.stdout.write("\nOBSERVER-DISCOVERY " + json.dumps(out) + "\n")


try:
    main()
except BaseException as e:  # report, never hang or traceback into the app's logs
    sys.stdout.write("\nOBSERVER-DISCOVERY " + json.dumps({"error": "%s: %s" % (type(e).__name__, e)}) + "\n")
    sys.exit(1)
