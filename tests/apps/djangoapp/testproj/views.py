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



# An HTTPS request made with GnuTLS (libcurl's GnuTLS flavour, through ctypes): TLS the
# agent does not decrypt, for the tests of how such connections are counted.
GNUTLS_GET = r"""
import ctypes

def gnutls_get(url):
    curl = ctypes.CDLL("libcurl-gnutls.so.4")
    curl.curl_easy_init.restype = ctypes.c_void_p
    curl.curl_easy_setopt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    curl.curl_easy_perform.argtypes = [ctypes.c_void_p]
    curl.curl_easy_getinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    curl.curl_easy_cleanup.argtypes = [ctypes.c_void_p]
    h = curl.curl_easy_init()
    u = ctypes.c_char_p(url.encode())
    curl.curl_easy_setopt(h, 10002, ctypes.cast(u, ctypes.c_void_p))  # CURLOPT_URL
    curl.curl_easy_setopt(h, 64, None)  # CURLOPT_SSL_VERIFYPEER 0: a test certificate
    curl.curl_easy_setopt(h, 81, None)  # CURLOPT_SSL_VERIFYHOST 0
    curl.curl_easy_setopt(h, 44, 1)  # CURLOPT_NOBODY: a HEAD, nothing written out
    rc = curl.curl_easy_perform(h)
    code = ctypes.c_long(0)
    curl.curl_easy_getinfo(h, 0x200002, ctypes.byref(code))  # CURLINFO_RESPONSE_CODE
    curl.curl_easy_cleanup(h)
    return f"{rc} {code.value}"
"""


def gnutls(request):
    """GETs `url` over GnuTLS, in this process or (`child=1`) in a child process that
    maps no OpenSSL at all (or, with `preload`, that library preloaded)."""
    import os
    import subprocess
    import sys

    url = request.GET["url"]
    if request.GET.get("child"):
        script = GNUTLS_GET + "\nimport sys\nprint(gnutls_get(sys.argv[1]))\n"
        env = dict(os.environ)
        if request.GET.get("preload"):
            env["LD_PRELOAD"] = request.GET["preload"]
            # The agent reads a process's mappings from /proc when it maps a library:
            # give it time to, on a busy machine, before this short-lived child is gone.
            script = "import time\ntime.sleep(1)\n" + script
        out = subprocess.run(
            [sys.executable, "-c", script, url], capture_output=True, text=True, timeout=30, env=env
        ).stdout.strip()
    else:
        ns = {}
        exec(GNUTLS_GET, ns)
        out = ns["gnutls_get"](url)
    # 502 unless curl succeeded (its result code 0) and got a 200.
    return HttpResponse(out + "\n", content_type="text/plain", status=200 if out == "0 200" else 502)
