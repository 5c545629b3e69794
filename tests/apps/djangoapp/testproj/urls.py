from django.urls import include, path

from . import views

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
    path("async/", views.aview, name="async-view"),
    path("async/stream", views.astream, name="async-stream"),
]

from django.conf import settings  # noqa: E402

if settings.DJANGO_PROMETHEUS:
    urlpatterns.append(path("", include("django_prometheus.urls")))
