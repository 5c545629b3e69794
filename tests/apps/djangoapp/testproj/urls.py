from django.urls import include, path

from . import cacheviews, dbviews, views

urlpatterns = [
    path("", views.index, name="index"),
    path("plain", views.plain),
    path("thing/", views.Thing.as_view()),
    path("shop/", include("shop.urls")),
    path("other/", include(("shop.urls", "shop"), namespace="other")),
    path("boom", views.boom, name="boom"),
    path("missing", views.missing, name="missing"),
    path("go", views.go, name="go"),
    path("tmpl", views.tmpl, name="tmpl"),
    path("stream", views.stream, name="stream"),
    path("big", views.big, name="big"),
    path("upload", views.upload, name="upload"),
    path("files/<path:rest>", views.files, name="files"),
    path("u/<uuid:id>/", views.by_uuid, name="by-uuid"),
    path("slow", views.slow, name="slow"),
    path("gnutls", views.gnutls, name="gnutls"),
    path("async/", views.aview, name="async-view"),
    path("async/stream", views.astream, name="async-stream"),
    path("db/create", dbviews.create, name="db-create"),
    path("db/save", dbviews.save, name="db-save"),
    path("db/delete", dbviews.delete, name="db-delete"),
    path("db/bulk", dbviews.bulk, name="db-bulk"),
    path("db/update", dbviews.update, name="db-update"),
    path("db/executemany", dbviews.executemany, name="db-executemany"),
    path("db/list", dbviews.listing, name="db-list"),
    path("db/unique-caught", dbviews.unique_caught, name="db-unique-caught"),
    path("db/unique-uncaught", dbviews.unique_uncaught, name="db-unique-uncaught"),
    path("db/missing-table", dbviews.missing_table, name="db-missing-table"),
    path("db/timeout", dbviews.timeout, name="db-timeout"),
    path("db/rollback", dbviews.rollback, name="db-rollback"),
    path("db/broken", dbviews.broken, name="db-broken"),
    path("db/wrongpw", dbviews.wrongpw, name="db-wrongpw"),
    path("db/raw", dbviews.raw, name="db-raw"),
    path("db/iterate", dbviews.iterate, name="db-iterate"),
    path("db/echo", dbviews.echo, name="db-echo"),
    path("db/seed-tags", dbviews.seed_tags, name="db-seed-tags"),
    path("db/locked", dbviews.locked, name="db-locked"),
    path("db/notadb", dbviews.notadb, name="db-notadb"),
    path("db/memory", dbviews.memory, name="db-memory"),
    path("db/ten", dbviews.ten, name="db-ten"),
    path("db/rows", dbviews.rows, name="db-rows"),
    path("db/nplus1", dbviews.nplus1, name="db-nplus1"),
    path("db/nplus1-fixed", dbviews.nplus1_fixed, name="db-nplus1-fixed"),
    path("cache/<str:op>", cacheviews.run, name="cache"),
]

from django.conf import settings  # noqa: E402

if settings.DJANGO_PROMETHEUS:
    urlpatterns.append(path("", include("django_prometheus.urls")))
