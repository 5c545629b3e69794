from django.urls import path, re_path

from . import views

app_name = "shop"
urlpatterns = [
    path("items/<int:pk>/", views.item, name="item"),
    path("c/<slug:slug>/", views.category),
    re_path(r"^legacy/(?P<year>[0-9]{4})/$", views.legacy, name="legacy"),
]
