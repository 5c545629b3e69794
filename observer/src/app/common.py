# Shared start of the observer's helper scripts, run with the target app's own
# interpreter, environment, working directory, user and mount namespace. They load the
# app's Django settings and print one marked JSON line (the app may print too). They
# change nothing in the app and write no files (python -B).
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


def setup():
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    argv = json.loads(os.environ.pop("OBSERVER_TARGET_ARGV", "[]"))
    find_settings(argv, cwd)

    import django

    django.setup()
    return django


def run(main, marker):
    try:
        out = main()
    except BaseException as e:  # report, never hang or traceback into the app's logs
        sys.stdout.write("\n" + marker + json.dumps({"error": "%s: %s" % (type(e).__name__, e)}) + "\n")
        sys.exit(1)
    sys.stdout.write("\n" + marker + json.dumps(out) + "\n")
