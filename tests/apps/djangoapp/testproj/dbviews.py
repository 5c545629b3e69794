"""Views that drive a known set of database operations (OBSERVER_TEST_PG must be set)."""
import itertools
import os

from django.db import IntegrityError, OperationalError, connection, connections, transaction
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from shop.models import Item

_names = itertools.count()


def _name(prefix):
    return "%s-%d-%d" % (prefix, os.getpid(), next(_names))


def create(request):
    item = Item.objects.create(name=_name("create"), price=1)
    return HttpResponse("created %d\n" % item.pk)


def save(request):
    item = Item.objects.create(name=_name("save"), price=1)
    item.price = 2
    item.save()
    return HttpResponse("saved %d\n" % item.pk)


def delete(request):
    item = Item.objects.create(name=_name("delete"), price=1)
    item.delete()
    return HttpResponse("deleted\n")


def bulk(request):
    Item.objects.bulk_create([Item(name=_name("bulk"), price=3) for _ in range(3)])
    return HttpResponse("bulk\n")


def update(request):
    n = Item.objects.filter(price=3).update(price=4)
    return HttpResponse("updated %d\n" % n)


def executemany(request):
    with connection.cursor() as c:
        c.executemany(
            "INSERT INTO shop_item (name, price) VALUES (%s, %s)",
            [(_name("many"), 5) for _ in range(4)],
        )
    return HttpResponse("executemany\n")


def listing(request):
    n = len(list(Item.objects.all().values_list("name", "price")))
    return HttpResponse("%d items\n" % n)


def unique_caught(request):
    name = _name("dup")
    Item.objects.create(name=name)
    try:
        with transaction.atomic():
            Item.objects.create(name=name)
    except IntegrityError:
        return HttpResponse("duplicate refused\n")
    return HttpResponse("no error?\n", status=500)


def unique_uncaught(request):
    name = _name("dup")
    Item.objects.create(name=name)
    Item.objects.create(name=name)  # IntegrityError: a 500
    return HttpResponse("unreachable\n")


def missing_table(request):
    with connection.cursor() as c:
        c.execute("SELECT * FROM no_such_table")  # ProgrammingError (UndefinedTable): a 500
    return HttpResponse("unreachable\n")


def timeout(request):
    try:
        with transaction.atomic():
            with connection.cursor() as c:
                c.execute("SET LOCAL statement_timeout = 50")
                c.execute("SELECT pg_sleep(2)")
    except OperationalError:
        return HttpResponse("cancelled\n")
    return HttpResponse("not cancelled?\n", status=500)


class Rollback(Exception):
    pass


def rollback(request):
    try:
        with transaction.atomic():
            Item.objects.create(name=_name("rollback"))
            raise Rollback
    except Rollback:
        pass
    return HttpResponse("rolled back\n")


def _refused(alias, sql, error, said):
    """A query on `alias` that must raise `error` (a 200 saying `said`), else a 500."""
    try:
        with connections[alias].cursor() as c:
            c.execute(sql)
    except error:
        return HttpResponse(said + "\n")
    return HttpResponse("no error?\n", status=500)


def broken(request):
    return _refused("broken", "SELECT 1", OperationalError, "refused")


def wrongpw(request):
    return _refused("wrongpw", "SELECT 1", OperationalError, "denied")


@csrf_exempt
def raw(request):
    with connection.cursor() as c:
        c.execute("SELECT count(*) FROM shop_item WHERE price >= %s", [0])
        (n,) = c.fetchone()
    return HttpResponse("%d\n" % n)


def iterate(request):
    # QuerySet.iterator() on PostgreSQL: a server-side cursor (DECLARE/FETCH/CLOSE).
    n = sum(1 for _ in Item.objects.all().iterator(chunk_size=2))
    return HttpResponse("%d\n" % n)


@csrf_exempt
def echo(request):
    """Carries the caller's marker everywhere a payload can hold it: SQL literals, a
    unique-violation error message, cache keys and values, response headers, a cookie and
    the body (the privacy test greps the agent's output for it)."""
    from django.core.cache import cache

    m = request.GET.get("m", "")
    n = Item.objects.filter(name__startswith=m).count()
    name = "%s-%d" % (m, next(_names))
    Item.objects.create(name=name, price=1)
    try:
        with transaction.atomic():
            Item.objects.create(name=name, price=1)
    except IntegrityError:
        pass
    cache.set("key-" + m, "value-" + m)
    hit = cache.get("key-" + m)
    r = HttpResponse("echo %s %d %s\n" % (m, n, hit))
    r["X-Echo"] = m
    r.set_cookie("echo", m)
    return r


def seed_tags(request):
    """Twelve tagged items for the N+1 views (once)."""
    from shop.models import Tag

    if Tag.objects.count() < 12:
        for i in range(12):
            item = Item.objects.create(name=_name("tagged"), price=i)
            Tag.objects.create(item=item, label="t%d" % i)
    return HttpResponse("ok\n")


def nplus1(request):
    """The classic N+1: one query for the tags, then one per tag for its item."""
    from shop.models import Tag

    names = [t.item.name for t in Tag.objects.order_by("id")[:12]]
    return HttpResponse("%d\n" % len(names))


def nplus1_fixed(request):
    """The same list with select_related: one query."""
    from shop.models import Tag

    names = [t.item.name for t in Tag.objects.select_related("item").order_by("id")[:12]]
    return HttpResponse("%d\n" % len(names))


def locked(request):
    """A write while another process holds the database's write lock (SQLite only: the
    test holds it; the "default" alias waits its short timeout, then gives up)."""
    try:
        Item.objects.create(name=_name("locked"), price=1)
    except OperationalError:
        return HttpResponse("locked\n")
    return HttpResponse("not locked?\n", status=500)


def notadb(request):
    """A query on the "notadb" alias, whose file is not a SQLite database: SQLite opens it
    and runs Django's connect statements (nothing there reads the file); the first one
    that reads the schema fails (SQLITE_NOTADB, a DatabaseError)."""
    from django.db import DatabaseError

    return _refused("notadb", "SELECT count(*) FROM sqlite_master", DatabaseError, "not a database")


def memory(request):
    """The in-memory "memory" alias (SQLite only): a table of its own, written and read
    back (one database per connection, kept by Django for the thread)."""
    with connections["memory"].cursor() as c:
        c.execute("CREATE TABLE IF NOT EXISTS scratch (n INTEGER)")
        c.execute("INSERT INTO scratch (n) VALUES (%s)", [1])
        c.execute("SELECT count(*) FROM scratch")
        (n,) = c.fetchone()
    return HttpResponse("%d\n" % n)


def ten(request):
    """Ten small queries (the bench's per-statement cost)."""
    found = sum(Item.objects.filter(price=i).exists() for i in range(10))
    return HttpResponse("%d\n" % found)


def rows(request):
    """One query returning 10,000 rows (the bench's per-row cost: no probe runs per row)."""
    n = len(list(Item.objects.values_list("id", "price")[:10000]))
    return HttpResponse("%d\n" % n)
