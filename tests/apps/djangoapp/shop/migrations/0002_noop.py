"""A migration that changes nothing: applying everything but it leaves one unapplied."""
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [migrations.RunSQL("SELECT 1", reverse_sql="SELECT 1")]
