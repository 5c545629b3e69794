from django.http import HttpResponse


def item(request, pk):
    return HttpResponse("item %d\n" % pk)


def category(request, slug):
    return HttpResponse("category %s\n" % slug)


def legacy(request, year):
    return HttpResponse("legacy %s\n" % year)
