//! The config file (TOML): one database's [`ArchiverOptions`] at the top level, or several
//! under `[[databases]]`.
//!
//! In the `[[databases]]` form, the top-level keys are defaults for every database; each
//! `[[databases]]` table has a `name`, a `db`, a `to`, and may set any other key of
//! [`ArchiverOptions`] for that database alone. Tables (`[store]`, and any table added to the
//! options later) merge key by key: a database's `[databases.store]` overrides only the keys
//! it sets. Keys that belong to the process (`metrics_addr`) are only accepted at the top;
//! keys each database must set for itself (`db`, `to`, `wal_dir`) only inside its table.

use std::collections::HashSet;
use std::path::Path;

use super::{ArchiverOptions, ConfigError};

/// Reads the config file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses the single-database form.
pub fn parse_one(text: &str) -> Result<ArchiverOptions, FileError> {
    toml::from_str::<ArchiverOptions>(text).map_err(FileError::Options)
}

/// Keys that belong to the whole process and are refused inside a `[[databases]]` table.
const PROCESS_KEYS: &[&str] = &["metrics_addr"];

/// Keys every database must set for itself, refused at the top level next to `[[databases]]`.
const OWN_KEYS: &[&str] = &["db", "to", "wal_dir"];

/// A database of the config file.
#[derive(Debug, Clone)]
pub struct Database {
    /// Its name: the `database` label of its metrics, the `database` field of its logs.
    pub name: String,
    /// Its options: the file's defaults, its own keys, then flags and environment.
    pub options: ArchiverOptions,
}

/// A config file that lists `[[databases]]`.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub databases: Vec<Database>,
    /// Where to serve metrics and health for the whole process.
    pub metrics_addr: Option<String>,
}

/// What is wrong with a config file's text.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("invalid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("{0}")]
    Invalid(String),
    /// The single-database form, as serde reports it.
    #[error(transparent)]
    Options(toml::de::Error),
}

pub(crate) fn invalid(msg: impl Into<String>) -> FileError {
    FileError::Invalid(msg.into())
}

/// True when the config text lists `[[databases]]` (the form this module runs).
pub fn lists_databases(text: &str) -> Result<bool, FileError> {
    let table: toml::Table = toml::from_str(text)?;
    Ok(table.contains_key("databases"))
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A database name: 1 to 64 letters, digits, `-`, `_` or `.`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), FileError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid database name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', \
             starting with a letter or digit"
        )))
    }
}

impl FleetConfig {
    /// Parses a config file that lists `[[databases]]`. Flags and environment are applied
    /// afterwards ([`super::layering`]), then [`FleetConfig::validate`].
    pub fn parse(text: &str) -> Result<FleetConfig, FileError> {
        let mut top: toml::Table = toml::from_str(text)?;
        let list = match top.remove("databases") {
            Some(toml::Value::Array(list)) if !list.is_empty() => list,
            Some(toml::Value::Array(_)) | None => {
                return Err(invalid(
                    "the config file lists no databases: add a [[databases]] table with name, \
                     db and to for each",
                ));
            }
            Some(_) => {
                return Err(invalid(
                    "`databases` must be a list of tables: write each as [[databases]]",
                ));
            }
        };
        for key in OWN_KEYS {
            if top.contains_key(*key) {
                return Err(invalid(format!(
                    "`{key}` is set at the top of a file that lists [[databases]]: each \
                     database has its own, so move it into its [[databases]] table"
                )));
            }
        }
        let metrics_addr = match top.remove("metrics_addr") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(_) => {
                return Err(invalid(
                    "`metrics_addr` must be a string, e.g. \"127.0.0.1:9187\"",
                ));
            }
        };
        // The defaults alone, so that a mistake in them is reported once.
        let defaults: ArchiverOptions = toml::Value::Table(top.clone())
            .try_into()
            .map_err(|e| invalid(format!("in the defaults at the top of the file: {e}")))?;
        let mut databases = Vec::new();
        let mut names = HashSet::new();
        for (i, entry) in list.into_iter().enumerate() {
            let toml::Value::Table(mut own) = entry else {
                return Err(invalid(format!(
                    "databases entry {} is not a table: write it as [[databases]]",
                    i + 1
                )));
            };
            let name = match own.remove("name") {
                Some(toml::Value::String(s)) => s,
                Some(_) => {
                    return Err(invalid(format!(
                        "the name of [[databases]] entry {} must be a string",
                        i + 1
                    )));
                }
                None => {
                    return Err(invalid(format!(
                        "[[databases]] entry {} has no name: add name = \"...\" (it labels the \
                         database's metrics and logs)",
                        i + 1
                    )));
                }
            };
            validate_name(&name)?;
            if !names.insert(name.clone()) {
                return Err(invalid(format!(
                    "two databases are named {name:?}: names must be unique"
                )));
            }
            for key in PROCESS_KEYS {
                if own.contains_key(*key) {
                    return Err(invalid(format!(
                        "database {name}: `{key}` is for the whole process; set it once at the \
                         top of the file"
                    )));
                }
            }
            let own_scratch = own.contains_key("scratch_dir");
            let mut merged = top.clone();
            merge(&mut merged, own);
            let mut options: ArchiverOptions = toml::Value::Table(merged)
                .try_into()
                .map_err(|e| invalid(format!("database {name}: {e}")))?;
            if !own_scratch && let Some(dir) = &defaults.scratch_dir {
                // A shared scratch directory gets one subdirectory per database.
                options.scratch_dir = Some(dir.join(&name));
            }
            databases.push(Database { name, options });
        }
        Ok(FleetConfig {
            databases,
            metrics_addr,
        })
    }

    /// Keeps only the database named `name`.
    pub fn select(&mut self, name: &str) -> Result<(), FileError> {
        let known: Vec<&str> = self.databases.iter().map(|d| d.name.as_str()).collect();
        if !known.contains(&name) {
            return Err(invalid(format!(
                "no database named {name:?} in the config file (it has: {})",
                known.join(", ")
            )));
        }
        self.databases.retain(|d| d.name == name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validation::nested;
    use std::path::Path;
    use std::time::Duration;
    use tidemark_manifest::store::StoreUrl;

    fn parse(text: &str) -> Result<FleetConfig, String> {
        let c = FleetConfig::parse(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err()
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../../scripts/archiver.many.example.toml");
        assert!(lists_databases(text).unwrap());
        let c = parse(text).unwrap();
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9187"));
        let names: Vec<&str> = c.databases.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["orders", "users", "billing"]);
        let [orders, users, billing] = &c.databases[..] else {
            panic!()
        };
        assert_eq!(orders.options.to, "s3://acme-backups/tidemark/orders");
        assert_eq!(orders.options.base_interval, Duration::from_secs(86_400));
        assert_eq!(users.options.base_interval, Duration::from_secs(6 * 3600));
        assert_eq!(users.options.sync_interval, Duration::from_secs(1));
        assert_eq!(billing.options.sync_interval, Duration::from_millis(250));
        // [store] defaults merge with a database's own [databases.store] key by key.
        assert_eq!(
            orders.options.store.access.region.as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            billing.options.store.access.region.as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            billing.options.store.write.storage_class.as_deref(),
            Some("STANDARD_IA")
        );
        assert_eq!(orders.options.store.write.storage_class, None);
    }

    #[test]
    fn the_single_database_example_is_not_the_many_form() {
        let text = include_str!("../../../scripts/archiver.example.toml");
        assert!(!lists_databases(text).unwrap());
    }

    const TWO: &str = r#"
        sync_interval = "2s"
        scratch_dir = "/var/tmp/tidemark"
        [store]
        region = "eu-west-1"
        [[databases]]
        name = "a"
        db = "/srv/a/db"
        to = "s3://bucket/a"
        [[databases]]
        name = "b"
        db = "/srv/b/db"
        to = "s3://bucket/b"
        sync_interval = "100ms"
        scratch_dir = "/srv/b/scratch"
        [databases.store]
        path_style = true
    "#;

    #[test]
    fn defaults_apply_and_entries_override() {
        let c = parse(TWO).unwrap();
        let (a, b) = (&c.databases[0].options, &c.databases[1].options);
        assert_eq!(a.sync_interval, Duration::from_secs(2));
        assert_eq!(b.sync_interval, Duration::from_millis(100));
        assert_eq!(a.store.access.region.as_deref(), Some("eu-west-1"));
        assert_eq!(b.store.access.region.as_deref(), Some("eu-west-1"));
        assert!(!a.store.access.path_style && b.store.access.path_style);
        // A shared scratch directory is divided by database; an own one is kept.
        assert_eq!(
            a.scratch_dir.as_deref(),
            Some(Path::new("/var/tmp/tidemark/a"))
        );
        assert_eq!(b.scratch_dir.as_deref(), Some(Path::new("/srv/b/scratch")));
        assert_eq!(c.metrics_addr, None);
    }

    #[test]
    fn mistakes_are_refused_with_a_message_that_names_them() {
        let one = |extra: &str, entry: &str| {
            format!(
                "{extra}\n[[databases]]\nname = \"a\"\ndb = \"/srv/a\"\nto = \"s3://bkt/a\"\n{entry}"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            ("databases = []".into(), "lists no databases"),
            ("databases = 3".into(), "list of tables"),
            (one("db = \"/x\"", ""), "`db` is set at the top"),
            (one("to = \"s3://bkt/x\"", ""), "`to` is set at the top"),
            (
                one("", "metrics_addr = \"127.0.0.1:1\""),
                "for the whole process",
            ),
            (one("", "colour = 1"), "database a: unknown field `colour`"),
            (one("colour = 1", ""), "in the defaults at the top"),
            (one("", "sync_interval = \"soon\""), "invalid duration"),
            (one("", "sync_interval = \"0s\""), "greater than zero"),
            (
                "[[databases]]\nname = \"a\"\ndb = \"/x\"\nto = \"ftp://x\"".into(),
                "database a:",
            ),
            (
                "[[databases]]\ndb = \"/x\"\nto = \"s3://bkt/x\"".into(),
                "has no name",
            ),
            (
                "[[databases]]\nname = \"a b\"\ndb = \"/x\"\nto = \"s3://bkt/x\"".into(),
                "invalid database name",
            ),
            (
                "[[databases]]\nname = \"a\"\nto = \"s3://bkt/x\"".into(),
                "no database directory",
            ),
            (
                "[[databases]]\nname = \"a\"\ndb = \"/x\"".into(),
                "no repository",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"a\"\ndb = \"/srv/b\"\nto = \"s3://bkt/b\"",
                ),
                "two databases are named \"a\"",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/./a\"\nto = \"s3://bkt/b\"",
                ),
                "databases a and b have the same db",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/a/\"",
                ),
                "have the same repository",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/a/sub\"",
                ),
                "repositories inside one another",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt\"",
                ),
                "repositories inside one another",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{text:?}: {e:?} should contain {want:?}");
        }
        // Prefixes that only share a beginning are different repositories; so are the same
        // prefix on two endpoints.
        parse(&one(
            "",
            "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/ab\"",
        ))
        .unwrap();
        parse(&one(
            "",
            "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/a\"\n[databases.store]\nendpoint_url = \"http://other:9000\"",
        ))
        .unwrap();
    }

    #[test]
    fn select_keeps_one_database_or_names_the_known_ones() {
        let mut c = parse(TWO).unwrap();
        let e = c.select("c").unwrap_err().to_string();
        assert!(e.contains("it has: a, b"), "{e}");
        c.select("b").unwrap();
        assert_eq!(c.databases.len(), 1);
        assert_eq!(c.databases[0].name, "b");
    }

    #[test]
    fn nested_repositories() {
        let u = |s: &str| StoreUrl::parse(s).unwrap();
        assert!(nested(&u("s3://bkt/x"), &u("s3://bkt/x")));
        assert!(nested(&u("s3://bkt/x"), &u("s3://bkt/x/y")));
        assert!(!nested(&u("s3://bkt/x"), &u("s3://bkt/xy")));
        assert!(!nested(&u("s3://bkt/x"), &u("s3://cde/x")));
        assert!(nested(&u("file:///srv/r"), &u("file:///srv/r/t")));
        assert!(!nested(&u("file:///srv/r"), &u("file:///srv/rt")));
        assert!(!nested(&u("file:///srv/r"), &u("s3://srv/r")));
    }
}
