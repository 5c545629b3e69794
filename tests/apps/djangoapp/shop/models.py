from django.conf import settings
from django.db import models

if settings.DJANGO_PROMETHEUS:
    from django_prometheus.models import ExportModelOperationsMixin

    _bases = (ExportModelOperationsMixin("item"), models.Model)
else:
    _bases = (models.Model,)


class Item(*_bases):
    name = models.CharField(max_length=100, unique=True)
    price = models.IntegerField(default=0)


class Tag(models.Model):
    """A foreign key to read with and without select_related (the N+1 views). DO_NOTHING:
    deleting an item issues no statement on this table, so the other tests' statement
    counts stay what they were."""

    item = models.ForeignKey(Item, on_delete=models.DO_NOTHING, db_constraint=False)
    label = models.CharField(max_length=50)
