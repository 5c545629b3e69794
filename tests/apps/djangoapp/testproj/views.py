import time

from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.views import View
from django.views.decorators.csrf import csrf_exempt


def index(request):
    return HttpResponse("index\n")


def plain(request):
    """An unnamed view: its label is its dotted path."""
    return HttpResponse("plain\n", content_type="text/plain; charset=iso-8859-1")


class Thing(View):
    """An unnamed class-based view: its label is the class's dotted path."""

    def get(self, request):
        return JsonResponse({"thing": True})


def boom(request):
    raise ValueError("boom")


def missing(request):
    raise Http404("nothing here")


def go(request):
    return redirect("/")


def tmpl(request):
    return TemplateResponse(request, "page.html", {"n": 3})


def stream(request):
    def parts():
        for i in range(5):
            yield ("part %d\n" % i).encode() * 100
    return StreamingHttpResponse(parts(), content_type="text/plain")


def big(request):
    return HttpResponse(b"x" * 200_000, content_type="application/octet-stream")


@csrf_exempt
def upload(request):
    body = request.body
    return HttpResponse("got %d bytes\n" % len(body), status=201)


def files(request, rest):
    return HttpResponse(rest)


def by_uuid(request, id):
    return HttpResponse(str(id))


def slow(request):
    time.sleep(0.3)
    return HttpResponse("slow\n")


async def aview(request):
    """An async view (served natively by ASGI servers)."""
    return HttpResponse("async view\n")


async def astream(request):
    async def parts():
        for i in range(3):
            yield ("async part %d\n" % i).encode()

    return StreamingHttpResponse(parts(), content_type="text/plain")
