//! Discovery: the app's URL resolver, the settings that change what django-prometheus
//! reports, where its databases and caches are and which tables its models use.

use std::time::Duration;

use serde::Deserialize;

use crate::views::{AppSettings, RawRoute};

const SCRIPT: &str = include_str!("discover.py");
const MARKER: &str = "OBSERVER-DISCOVERY ";

/// One DATABASES entry (never its password).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Database {
    pub alias: String,
    /// Django's `DatabaseWrapper.vendor` ("postgresql", "mysql", "sqlite"...).
    pub vendor: Option<String>,
    pub engine: Option<String>,
    pub name: Option<String>,
    pub user: Option<String>,
    /// A host name or address, or a directory of Unix sockets; empty for the default.
    pub host: Option<String>,
    /// Empty for the default.
    #[serde(default)]
    pub port: String,
    /// Django's psycopg connection pool (OPTIONS["pool"]).
    #[serde(default)]
    pub pool: bool,
}

/// One CACHES entry (never its credentials).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Cache {
    pub alias: String,
    /// The BACKEND class path.
    pub backend: Option<String>,
    /// The `backend` label django-prometheus gives its class ("redis", "native_redis",
    /// "memcached", "locmem", "filebased"), from the class's ancestry.
    pub kind: Option<String>,
    /// LOCATION entries: Redis URLs (credentials and options dropped), `host:port`,
    /// `unix:/path` or a socket path.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Keys are `<key_head><version><key_tail><key>` (read from the cache's own
    /// `make_key`); unset when its key function makes another shape.
    pub key_head: Option<String>,
    pub key_tail: Option<String>,
}

/// One model's table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModelTable {
    pub table: String,
    /// `_meta.model_name`.
    pub model: String,
    /// The name given to django-prometheus's `ExportModelOperationsMixin`, if it has it.
    pub mixin: Option<String>,
}

/// What the app's resolver and settings said.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub django: String,
    pub settings: AppSettings,
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub databases: Vec<Database>,
    #[serde(default)]
    pub caches: Vec<Cache>,
    #[serde(default)]
    pub models: Vec<ModelTable>,
}

#[derive(Debug, Deserialize)]
struct Output {
    #[serde(flatten)]
    discovery: Option<Discovery>,
    error: Option<String>,
}

/// Runs the discovery for the app that `pid` belongs to.
pub fn discover(pid: u32, timeout: Duration) -> Result<Discovery, String> {
    let script = format!("{}\n{SCRIPT}", super::COMMON);
    let line = super::run_script(pid, &script, MARKER, timeout)?;
    parse_line(&line)
}

/// The marked line of the script's output.
pub fn parse_output(out: &str) -> Result<Discovery, String> {
    parse_line(super::marked_line(out, MARKER)?)
}

fn parse_line(line: &str) -> Result<Discovery, String> {
    let o: Output = serde_json::from_str(line).map_err(|e| format!("discovery output: {e}"))?;
    if let Some(e) = o.error {
        return Err(crate::text::printable(&e, super::MAX_ERROR));
    }
    o.discovery.ok_or_else(|| "empty discovery output".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_found_after_app_prints() {
        let out = "hello from settings\n\nOBSERVER-DISCOVERY {\"django\":\"5.2.19\",\"settings\":{\"APPEND_SLASH\":true,\"DEFAULT_CHARSET\":\"utf-8\",\"SECURE_PROXY_SSL_HEADER\":[\"HTTP_X_FORWARDED_PROTO\",\"https\"]},\"routes\":[{\"view\":\"index\",\"segments\":[{\"kind\":\"route\",\"regex\":\"^\\\\Z\",\"endpoint\":true}]}],\"databases\":[{\"alias\":\"default\",\"vendor\":\"postgresql\",\"engine\":\"django.db.backends.postgresql\",\"name\":\"app\",\"user\":\"u\",\"host\":\"\",\"port\":\"\",\"pool\":false}],\"caches\":[{\"alias\":\"default\",\"backend\":\"django_redis.cache.RedisCache\",\"kind\":\"redis\",\"servers\":[\"redis://127.0.0.1:6379/0\"],\"key_head\":\":\",\"key_tail\":\":\"}],\"models\":[{\"table\":\"shop_item\",\"model\":\"item\",\"mixin\":null}]}\n";
        let d = parse_output(out).unwrap();
        assert_eq!(d.django, "5.2.19");
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.settings.secure_header(), Some(("x-forwarded-proto".into(), "https".into())));
        let t = crate::views::RouteTable::new(&d.routes);
        assert_eq!(t.resolve("/").as_deref(), Some("index"));
        assert_eq!(d.databases[0].vendor.as_deref(), Some("postgresql"));
        assert_eq!(d.models[0].model, "item");
        assert_eq!(d.caches[0].kind.as_deref(), Some("redis"));
        assert_eq!(d.caches[0].key_tail.as_deref(), Some(":"));
    }

    #[test]
    fn errors_are_reported() {
        let e = parse_output("OBSERVER-DISCOVERY {\"error\":\"ImproperlyConfigured: no settings\"}\n")
            .unwrap_err();
        assert!(e.contains("ImproperlyConfigured"));
        assert!(parse_output("nothing").is_err());
    }
}
