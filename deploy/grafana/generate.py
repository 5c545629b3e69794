#!/usr/bin/env python3
"""Writes observer's Grafana dashboards (the *.json next to this file) from the metric
catalogue: django-prometheus's families as observer exports them, and observer's own.

    python3 deploy/grafana/generate.py           # write them
    python3 deploy/grafana/generate.py --check   # fail if the files differ

Every Django panel filters on cluster, namespace and job (regex matchers, so "All" also
matches series without the label, as on a host without Kubernetes), and on view and
method where the family has them.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}
# Views that are not application traffic.
NOT_APP = 'view!~"<unnamed view>|prometheus-django-metrics|health_check.*"'


def sel(*extra):
    base = ['cluster=~"$cluster"', 'namespace=~"$namespace"', 'job=~"$job"']
    return "{" + ", ".join(base + list(extra)) + "}"


VIEW = ('view=~"$view"', 'method=~"$method"')


def variable(name, query, label=None, multi=True):
    return {
        "type": "query",
        "name": name,
        "label": label or name,
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "refresh": 2,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def datasource_var():
    return {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus", "current": {}}


def django_vars(metric, *more):
    out = [
        datasource_var(),
        variable("cluster", "label_values(%s, cluster)" % metric),
        variable("namespace", 'label_values(%s{cluster=~"$cluster"}, namespace)' % metric),
        variable("job", 'label_values(%s{cluster=~"$cluster", namespace=~"$namespace"}, job)' % metric),
    ]
    return out + list(more)


class Layout:
    """Panels left to right, rows of 24 units."""

    def __init__(self):
        self.panels = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def add(self, panel, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def row(self, title):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append(
            {"type": "row", "title": title, "id": len(self.panels) + 1, "collapsed": False, "panels": [],
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}}
        )
        self.y += 1


def targets(*exprs):
    return [
        {"datasource": DS, "expr": e, "legendFormat": legend, "refId": chr(ord("A") + i)}
        for i, (e, legend) in enumerate(exprs)
    ]


def stat(title, unit, *exprs, description=""):
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets(*exprs),
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 2}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value",
                    "graphMode": "area", "textMode": "auto"},
    }


def series(title, unit, *exprs, description="", stack=False):
    custom = {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets(*exprs),
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def table(title, *exprs, description=""):
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [dict(t, instant=True, format="table") for t in targets(*exprs)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
    }


def dashboard(uid, title, description, variables, layout, tags=("django", "observer")):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": list(tags),
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["observer"], "asDropdown": True, "title": "observer dashboards"}],
        "panels": layout.panels,
    }


def rate(metric, *extra, window="$__rate_interval"):
    return "rate(%s%s[%s])" % (metric, sel(*extra), window)


def quantile(q, metric, by, *extra):
    return "histogram_quantile(%s, sum by (le, %s) (%s))" % (q, by, rate(metric + "_bucket", *extra))


RESP = "django_http_responses_total_by_status_view_method_total"
REQ_VIEW = "django_http_requests_total_by_view_transport_method_total"
LAT_VIEW = "django_http_requests_latency_seconds_by_view_method"


def ratio(status_re, by, *extra):
    return "sum by (%s) (%s) / sum by (%s) (%s)" % (
        by, rate(RESP, 'status=~"%s"' % status_re, *extra), by, rate(RESP, *extra))


def overview():
    l = Layout()
    l.row("Requests")
    l.add(stat("Requests/s", "reqps", ("sum(%s)" % rate("django_http_requests_before_middlewares_total"), "requests/s")), 6, 5)
    for cls, name in (("2..", "2xx"), ("4..", "4xx"), ("5..", "5xx")):
        l.add(stat("%s share" % name, "percentunit", ("sum(%s) / sum(%s)" % (rate(RESP, 'status=~"%s"' % cls), rate(RESP)), name)), 6, 5)
    l.add(series("Responses by status class", "reqps",
                 ('sum by (status_class) (label_replace(%s, "status_class", "${1}xx", "status", "(.).*"))' % rate(RESP), "{{status_class}}"),
                 stack=True), 12, 8)
    l.add(series("Latency (all views)", "s",
                 *[(quantile(q, "django_http_requests_latency_including_middlewares_seconds", "job"), "p%s" % p) for q, p in ((0.5, "50"), (0.95, "95"), (0.99, "99"))]), 12, 8)
    l.row("Database")
    l.add(series("Statements/s by database", "ops",
                 ("sum by (alias, vendor) (%s)" % rate("django_db_execute_total"), "{{alias}} ({{vendor}})")), 8, 8)
    l.add(series("Query duration by database", "s",
                 *[(quantile(q, "django_db_query_duration_seconds", "alias"), "{{alias}} p%s" % p) for q, p in ((0.5, "50"), (0.95, "95"), (0.99, "99"))]), 8, 8)
    l.add(series("Errors/s by type", "ops",
                 ("sum by (alias, type) (%s)" % rate("django_db_errors_total"), "{{alias}} {{type}}")), 8, 8)
    l.add(series("New connections/s and failures", "ops",
                 ("sum by (alias) (%s)" % rate("django_db_new_connections_total"), "{{alias}} new"),
                 ("sum by (alias) (%s)" % rate("django_db_new_connection_errors_total"), "{{alias}} failed")), 12, 8)
    l.add(table("Migrations by database",
                ("max by (connection) (django_migrations_applied_total%s)" % sel(), "applied"),
                ("max by (connection) (django_migrations_unapplied_total%s)" % sel(), "unapplied")), 12, 8)
    l.row("Cache")
    l.add(stat("Cache hit ratio", "percentunit",
               ("sum(%s) / sum(%s)" % (rate("django_cache_get_hits_total", window="30m"), rate("django_cache_get_total", window="30m")), "hit ratio"),
               description="Hits over gets, 30 minutes."), 6, 8)
    l.add(series("Cache gets/s by outcome", "ops",
                 ("sum by (backend) (%s)" % rate("django_cache_get_hits_total"), "{{backend}} hits"),
                 ("sum by (backend) (%s)" % rate("django_cache_get_misses_total"), "{{backend}} misses"),
                 ("sum by (backend) (%s)" % rate("django_cache_get_fail_total"), "{{backend}} failures")), 18, 8)
    return dashboard("observer-django-overview", "Django / Overview",
                     "Requests, database and cache of the Django apps observer traces.",
                     django_vars("django_http_requests_before_middlewares_total"), l)


def requests_overview():
    l = Layout()
    l.add(series("Requests/s by view", "reqps",
                 ("sum by (view) (%s)" % rate(REQ_VIEW, NOT_APP, *VIEW), "{{view}}")), 12, 9)
    l.add(series("Responses/s by status", "reqps",
                 ("sum by (status) (%s)" % rate(RESP, NOT_APP, *VIEW), "{{status}}"), stack=True), 12, 9)
    l.add(series("Latency by view (p95)", "s",
                 (quantile(0.95, LAT_VIEW, "view", NOT_APP, *VIEW), "{{view}}")), 12, 9)
    l.add(series("Requests/s by method and transport", "reqps",
                 ("sum by (method, transport) (%s)" % rate(REQ_VIEW, NOT_APP, *VIEW), "{{method}} {{transport}}")), 12, 9)
    l.add(series("Body sizes (p95)", "bytes",
                 (quantile(0.95, "django_http_requests_body_total_bytes", "job"), "requests"),
                 (quantile(0.95, "django_http_responses_body_total_bytes", "job"), "responses")), 8, 8)
    l.add(series("Streaming and AJAX responses/s", "reqps",
                 ("sum(%s)" % rate("django_http_responses_streaming_total"), "streaming"),
                 ("sum(%s)" % rate("django_http_ajax_requests_total"), "ajax")), 8, 8)
    l.add(table("Busiest views (1h)",
                ("topk(10, sum by (view) (%s))" % rate(REQ_VIEW, NOT_APP, window="1h"), "{{view}}")), 8, 8)
    view = variable("view", 'label_values(%s{cluster=~"$cluster", namespace=~"$namespace", job=~"$job"}, view)' % RESP)
    method = variable("method", 'label_values(%s{cluster=~"$cluster", namespace=~"$namespace", job=~"$job", view=~"$view"}, method)' % RESP)
    return dashboard("observer-django-requests", "Django / Requests",
                     "Traffic, status codes, latency and sizes across the views of the Django apps.",
                     django_vars(RESP, view, method), l)


def requests_by_view():
    l = Layout()
    l.add(stat("Requests/s", "reqps", ("sum(%s)" % rate(REQ_VIEW, *VIEW), "requests/s")), 6, 5)
    l.add(stat("4xx share", "percentunit", (ratio("4..", "job", *VIEW), "4xx")), 6, 5)
    l.add(stat("5xx share", "percentunit", (ratio("5..", "job", *VIEW), "5xx")), 6, 5)
    l.add(stat("p95 latency", "s", (quantile(0.95, LAT_VIEW, "job", *VIEW), "p95")), 6, 5)
    l.add(series("Requests/s by method", "reqps",
                 ("sum by (view, method) (%s)" % rate(REQ_VIEW, *VIEW), "{{view}} {{method}}")), 12, 9)
    l.add(series("Responses/s by status", "reqps",
                 ("sum by (view, status) (%s)" % rate(RESP, *VIEW), "{{view}} {{status}}"), stack=True), 12, 9)
    l.add(series("Latency", "s",
                 *[(quantile(q, LAT_VIEW, "view", *VIEW), "{{view}} p%s" % p) for q, p in ((0.5, "50"), (0.95, "95"), (0.99, "99"))]), 12, 9)
    l.add(series("Error share by view", "percentunit",
                 (ratio("4..", "view", *VIEW), "{{view}} 4xx"),
                 (ratio("5..", "view", *VIEW), "{{view}} 5xx")), 12, 9)
    view = variable("view", 'label_values(%s{cluster=~"$cluster", namespace=~"$namespace", job=~"$job", %s}, view)' % (RESP, NOT_APP))
    method = variable("method", 'label_values(%s{cluster=~"$cluster", namespace=~"$namespace", job=~"$job", view=~"$view"}, method)' % RESP)
    return dashboard("observer-django-requests-by-view", "Django / Requests by view",
                     "One view (or a few) of a Django app: rate, errors and latency.",
                     django_vars(RESP, view, method), l)


STMTS = "django_view_db_statements_per_request"
DB_S = "django_view_db_seconds_per_request"
DB_SHARE = "django_view_db_latency_share"
GETS = "django_view_cache_gets_per_request"
N1 = "django_view_n_plus_one_requests_total"
V = ('view=~"$view"',)


def mean(metric, by, *extra):
    return "sum by (%s) (%s) / sum by (%s) (%s)" % (by, rate(metric + "_sum", *extra), by, rate(metric + "_count", *extra))


def views_profile():
    """observer's per-view families (django_view_*): what django-prometheus cannot show."""
    l = Layout()
    l.add(stat("N+1 requests/s", "reqps", ("sum(%s)" % rate(N1, *V), "N+1 requests/s"),
               description="Requests in which one statement shape ran at least --n-plus-one-threshold times."), 6, 5)
    l.add(stat("Statements per request", "short", (mean(STMTS, "job", *V), "statements")), 6, 5)
    l.add(stat("DB time per request", "s", (mean(DB_S, "job", *V), "DB time")), 6, 5)
    l.add(stat("Share of latency in the DB", "percentunit", (mean(DB_SHARE, "job", *V), "DB share")), 6, 5)
    l.row("N+1 suspects")
    l.add(series("N+1 share of requests by view", "percentunit",
                 ("sum by (view) (%s) / sum by (view) (%s)" % (rate(N1, *V), rate(STMTS + "_count", *V)), "{{view}}"),
                 description="Share of each view's requests that ran one statement shape in a loop; `observer top` on the node shows the shape."), 12, 9)
    l.add(table("Views by N+1 share (last hour)",
                ("sort_desc(sum by (view) (increase(%s%s[1h])) / sum by (view) (increase(%s_count%s[1h])))"
                 % (N1, sel(*V), STMTS, sel(*V)), "{{view}}")), 12, 9)
    l.row("Database by view")
    l.add(series("Statements per request by view", "short",
                 (mean(STMTS, "view", *V), "{{view}} mean"),
                 (quantile(0.95, STMTS, "view", *V), "{{view}} p95")), 12, 9)
    l.add(series("DB time per request by view", "s",
                 (mean(DB_S, "view", *V), "{{view}} mean"),
                 (quantile(0.95, DB_S, "view", *V), "{{view}} p95")), 12, 9)
    l.add(series("Share of latency in the DB by view", "percentunit", (mean(DB_SHARE, "view", *V), "{{view}}"),
                 description="DB-bound views: most of their time is spent waiting for the database."), 12, 9)
    l.row("Cache by view")
    l.add(series("Cache gets per request by view", "short", (mean(GETS, "view", *V), "{{view}}")), 12, 9)
    l.add(series("Cache hit ratio by view", "percentunit",
                 ("sum by (view) (%s) / (sum by (view) (%s) + sum by (view) (%s))"
                  % (rate("django_view_cache_get_hits_total", *V), rate("django_view_cache_get_hits_total", *V),
                     rate("django_view_cache_get_misses_total", *V)), "{{view}}")), 12, 9)
    view = variable("view", 'label_values(%s_count{cluster=~"$cluster", namespace=~"$namespace", job=~"$job", %s}, view)' % (STMTS, NOT_APP))
    return dashboard("observer-django-views-profile", "Django / Views: database and cache",
                     "Per view, what django-prometheus cannot tell: statements, database time and cache use per request, and N+1 suspects (observer's django_view_* families).",
                     django_vars(STMTS + "_count", view), l)


def models():
    l = Layout()
    m = ('model=~"$model"',)
    l.add(series("Operations/s", "ops",
                 ("sum(%s)" % rate("django_model_inserts_total", *m), "inserts"),
                 ("sum(%s)" % rate("django_model_updates_total", *m), "updates"),
                 ("sum(%s)" % rate("django_model_deletes_total", *m), "deletes")), 24, 8)
    for op in ("inserts", "updates", "deletes"):
        l.add(series("%s/s by model" % op.capitalize(), "ops",
                     ("sum by (model) (%s)" % rate("django_model_%s_total" % op, *m), "{{model}}")), 8, 8)
    l.add(table("Most written models (1h)",
                ("topk(10, sum by (model) (%s))" % rate("django_model_inserts_total", *m, window="1h"), "inserts"),
                ("topk(10, sum by (model) (%s))" % rate("django_model_updates_total", *m, window="1h"), "updates")), 24, 8)
    model = variable("model", 'label_values(django_model_inserts_total{cluster=~"$cluster", namespace=~"$namespace", job=~"$job"}, model)')
    return dashboard("observer-django-models", "Django / Models",
                     "Inserts, updates and deletes by model (INSERT/UPDATE/DELETE statements on each model's table).",
                     django_vars("django_model_inserts_total", model), l)


def health():
    l = Layout()
    f = '{cluster=~"$cluster", instance=~"$instance"}'

    def r(metric, extra=""):
        s = f if not extra else f[:-1] + ", " + extra + "}"
        return "rate(%s%s[$__rate_interval])" % (metric, s)

    l.row("Agent")
    l.add(stat("Agents up", "short", ('sum(up{job="observer", cluster=~"$cluster", instance=~"$instance"})', "up")), 6, 5)
    l.add(stat("Apps traced", "short", ("sum(observer_targets%s)" % f, "apps")), 6, 5)
    l.add(stat("Processes traced", "short", ("sum(observer_processes%s)" % f, "processes")), 6, 5)
    l.add(stat("Connections traced", "short", ("sum(observer_connections%s)" % f, "connections")), 6, 5)
    l.add(series("CPU", "percentunit", ("sum by (instance) (%s)" % r("observer_process_cpu_seconds_total"), "{{instance}}")), 12, 8)
    l.add(series("Memory (RSS)", "bytes", ("sum by (instance) (observer_process_resident_memory_bytes%s)" % f, "{{instance}}")), 12, 8)
    l.row("Capture")
    l.add(series("Records/s and bytes/s", "short",
                 ("sum by (instance) (%s)" % r("observer_records_total"), "{{instance}} records/s"),
                 ("sum by (instance) (%s)" % r("observer_data_bytes_total"), "{{instance}} bytes/s")), 12, 8)
    l.add(series("Records lost/s by reason", "short",
                 ("sum by (instance, reason) (%s)" % r("observer_records_lost_total"), "{{instance}} {{reason}}"),
                 description="Any loss makes the apps' counts low: raise --ring-buffer-bytes or the agent's CPU."), 12, 8)
    l.add(series("Kernel tables full/s", "short",
                 ("sum by (instance, table) (%s)" % r("observer_table_full_total"), "{{instance}} {{table}}")), 12, 8)
    l.add(series("Connections opened/s", "short",
                 ("sum by (instance) (%s)" % r("observer_connections_opened_total"), "{{instance}}")), 12, 8)
    l.row("Parsing")
    l.add(series("Exchanges, statements and cache gets/s", "ops",
                 ("sum by (instance) (%s)" % r("observer_http_exchanges_total"), "{{instance}} HTTP exchanges"),
                 ("sum by (instance) (%s)" % r("observer_db_statements_total"), "{{instance}} DB statements"),
                 ("sum by (instance) (%s)" % r("observer_cache_gets_total"), "{{instance}} cache gets")), 12, 8)
    l.add(series("Parse errors/s", "short",
                 ("sum by (instance) (%s) or sum by (instance) (%s * 0)" % (r("observer_parse_errors_total"), r("observer_records_total")), "{{instance}}"),
                 description="Bytes a parser could not follow (each followed by a resync); by protocol and reason in observer_parse_errors_total."), 12, 8)
    l.add(series("Route discovery", "short",
                 ("sum by (instance, result) (increase(observer_route_discovery_total%s[1h]))" % f, "{{instance}} {{result}}")), 12, 8)
    l.add(series("Per-view attribution/s", "short",
                 ("sum by (instance, kind) (%s)" % r("observer_profile_attributed_total"), "{{instance}} {{kind}} attributed"),
                 ("sum by (instance, kind, reason) (%s)" % r("observer_profile_unattributed_total"), "{{instance}} {{kind}} unattributed: {{reason}}"),
                 description="Statements and cache lookups given to the request they were made for, and those no request could be given."), 12, 8)
    l.add(series("Ignored and dropped/s", "short",
                 ("sum by (instance) (%s)" % r("observer_cache_gets_ignored_total"), "{{instance}} cache gets of other clients"),
                 ("sum by (instance) (%s)" % r("observer_discovery_backlog_dropped_total"), "{{instance}} backlog dropped"),
                 ("sum by (instance) (%s)" % r("observer_not_http_connections_total"), "{{instance}} not-HTTP connections")), 12, 8)
    variables = [
        datasource_var(),
        variable("cluster", "label_values(observer_build_info, cluster)"),
        variable("instance", 'label_values(observer_build_info{cluster=~"$cluster"}, instance)'),
    ]
    return dashboard("observer-health", "observer / Health",
                     "The observer agents themselves: what they trace, what they lose, what they cost.",
                     variables, l, tags=("observer",))


DASHBOARDS = {
    "django-overview.json": overview,
    "django-requests.json": requests_overview,
    "django-requests-by-view.json": requests_by_view,
    "django-models.json": models,
    "django-views-profile.json": views_profile,
    "observer-health.json": health,
}


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, make in DASHBOARDS.items():
        text = json.dumps(make(), indent=2, sort_keys=True) + "\n"
        path = os.path.join(HERE, name)
        if check:
            try:
                with open(path) as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
    if stale:
        sys.exit("stale dashboards (run python3 deploy/grafana/generate.py): " + ", ".join(stale))


if __name__ == "__main__":
    main()
