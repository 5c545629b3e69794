# Migrations: for each DATABASES alias, the applied and unapplied counts exactly as
# django-prometheus's ExportMigrations() computes them (django_migrations_*_total).
# Follows common.py. Reads the django_migrations table; changes nothing.


def main():
    setup()
    from django.db import connections
    from django.db.backends.dummy.base import DatabaseWrapper as Dummy
    from django.db.migrations.executor import MigrationExecutor

    out = {}
    # DATABASES = {}: Django's dummy backend; django-prometheus exports nothing then.
    if "default" in connections and isinstance(connections["default"], Dummy):
        return {"aliases": out}
    for alias in connections.databases:
        try:
            executor = MigrationExecutor(connections[alias])
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
            out[alias] = {"applied": len(executor.loader.applied_migrations), "unapplied": len(plan)}
        except Exception as e:
            out[alias] = {"error": "%s: %s" % (type(e).__name__, e)}
        finally:
            try:
                connections[alias].close()
            except Exception:
                pass
    return {"aliases": out}


run(main, "OBSERVER-MIGRATIONS ")
