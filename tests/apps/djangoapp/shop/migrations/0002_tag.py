"""Tags on items (a foreign key, for the N+1 views). Tests that migrate back to 0001 leave
this one unapplied."""
import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [
        migrations.CreateModel(
            name="Tag",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("label", models.CharField(max_length=50)),
                ("item", models.ForeignKey(db_constraint=False, on_delete=django.db.models.deletion.DO_NOTHING, to="shop.item")),
            ],
        ),
    ]
