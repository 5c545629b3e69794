"""Settings of the end-to-end test app.

OBSERVER_TEST_DJANGO_PROMETHEUS=1 installs django-prometheus (middlewares and the
/metrics view), for side-by-side runs; without it the app has no instrumentation at all.
"""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "observer-test-app-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "testproj.urls"
WSGI_APPLICATION = "testproj.wsgi.application"
USE_TZ = True
DATABASES = {}
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

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

DJANGO_PROMETHEUS = os.environ.get("OBSERVER_TEST_DJANGO_PROMETHEUS") == "1"
if DJANGO_PROMETHEUS:
    INSTALLED_APPS.append("django_prometheus")
    MIDDLEWARE = (
        ["django_prometheus.middleware.PrometheusBeforeMiddleware"]
        + MIDDLEWARE
        + ["django_prometheus.middleware.PrometheusAfterMiddleware"]
    )
