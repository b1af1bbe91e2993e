//! Command-line options both programs share: where the repository is and how to reach it.
//! Each flag can also come from the environment (`TIDEMARK_*`), so the archiver's service
//! unit and the restore tool's drills are configured the same way.

use std::path::PathBuf;
use std::sync::Arc;

use crate::repo::{RepoError, Repository};
use crate::store::{
    EncryptionKey, EncryptionKeyError, OpenOptions, Rate, S3Options, Sse, StoreError, StoreUrl,
    open_store_with,
};

/// The environment variable that may hold the encryption key itself (there is no flag for
/// it, so that the key never shows in a process listing).
///
/// Its text is wiped from Tidemark's memory once parsed, but the variable stays in the
/// process's environment (`/proc/PID/environ`, readable by the same user and root): Rust
/// can remove a variable only with `unsafe` code (`std::env::remove_var` is unsound while
/// other threads may read the environment), which Tidemark forbids. What matters is that
/// it goes no further: every process Tidemark starts gets only [`child_env`].
pub const ENCRYPTION_KEY_ENV: &str = "TIDEMARK_ENCRYPTION_KEY";

/// The variables a process that Tidemark starts (a drill's check command, `kill`) gets from
/// Tidemark's environment, when they are set, besides the variables `LC_*`: enough to find
/// programs and to run in the operator's locale, time zone and home directory. Nothing else
/// passes unless asked for by name, in particular no encryption key and no cloud credential.
pub const CHILD_ENV: [&str; 10] = [
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
];

/// The environment of a process Tidemark starts: [`CHILD_ENV`], `LC_*`, and the variables
/// named in `extra` (an explicit opt-in), with their values from Tidemark's environment.
/// Start the process with `env_clear()` and then these.
pub fn child_env(extra: &[String]) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    std::env::vars_os()
        .filter(|(name, _)| {
            name.to_str().is_some_and(|n| {
                CHILD_ENV.contains(&n) || n.starts_with("LC_") || extra.iter().any(|e| e == n)
            })
        })
        .collect()
}

/// Checks the names given to pass to a child process: each a plain variable name.
pub fn check_env_names(names: &[String]) -> Result<(), String> {
    for n in names {
        if n.is_empty() || n.contains(['=', '\0']) {
            return Err(format!(
                "{n:?} is not an environment variable name; give a name such as PGPASSWORD"
            ));
        }
    }
    Ok(())
}

/// The spellings a boolean flag's environment variable may take (any case): `1`, `true`,
/// `yes`, `on` and `0`, `false`, `no`, `off`.
pub const BOOL_WORDS: &str = "1/0, true/false, yes/no or on/off";

/// Parses the value of a boolean flag (from its environment variable, e.g.
/// `TIDEMARK_PATH_STYLE=1`): [`BOOL_WORDS`], any case, surrounding blanks ignored; an empty
/// variable is as if unset (no).
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("not a yes/no value: give {BOOL_WORDS}")),
    }
}

/// How to reach and read the store: what every command needs, reading or writing.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StoreAccess {
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS).
    #[arg(long, env = "TIDEMARK_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// The bucket's region (default: from the AWS configuration; us-east-1 with --endpoint-url).
    #[arg(long, env = "TIDEMARK_REGION")]
    pub region: Option<String>,
    /// Path-style bucket addressing (most S3-compatible servers need it).
    #[arg(long, env = "TIDEMARK_PATH_STYLE", value_parser = parse_bool)]
    pub path_style: bool,
    /// Seconds one attempt of a small request may take before it is retried (default 30).
    #[arg(long, env = "TIDEMARK_REQUEST_TIMEOUT", value_name = "SECONDS")]
    pub request_timeout: Option<u64>,
    /// The repository's client-side encryption key: a file holding 32 bytes (64 hex digits,
    /// base64, or raw; not readable by other users). A repository created with it is
    /// encrypted. TIDEMARK_ENCRYPTION_KEY may hold the key itself instead.
    #[arg(long, env = "TIDEMARK_ENCRYPTION_KEY_FILE", value_name = "PATH")]
    pub encryption_key_file: Option<PathBuf>,
    /// The key itself, for programs that hold it already; takes precedence over the file and
    /// the environment. Shown by `Debug` only as its key id, never serialized.
    #[arg(skip)]
    #[serde(skip)]
    pub encryption_key: Option<EncryptionKey>,
}

/// How new objects are written: only the commands that upload data take these.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StoreWrite {
    /// Storage class of new data objects (base files, WAL segments), e.g. STANDARD_IA;
    /// documents always get the bucket's default. GLACIER and DEEP_ARCHIVE are refused.
    #[arg(long, env = "TIDEMARK_STORAGE_CLASS", value_name = "CLASS")]
    pub storage_class: Option<String>,
    /// Storage class of base backups' files (sst/, bases/*/files/), e.g. STANDARD_IA
    /// (default: --storage-class).
    #[arg(long, env = "TIDEMARK_BASE_STORAGE_CLASS", value_name = "CLASS")]
    pub base_storage_class: Option<String>,
    /// Storage class of WAL segments (wal/), e.g. STANDARD (default: --storage-class).
    #[arg(long, env = "TIDEMARK_WAL_STORAGE_CLASS", value_name = "CLASS")]
    pub wal_storage_class: Option<String>,
    /// Limit the process's uploads to this rate, e.g. 50MiB/s, 500KB/s or 100Mbit/s (at
    /// least 64KiB/s; default: no limit). WAL segments and documents go ahead of base files.
    #[arg(long, env = "TIDEMARK_MAX_UPLOAD_RATE", value_name = "RATE")]
    pub max_upload_rate: Option<Rate>,
    /// Server-side encryption of new objects: AES256 or aws:kms.
    #[arg(long, env = "TIDEMARK_SSE", value_name = "AES256|aws:kms")]
    pub sse: Option<String>,
    /// KMS key id, ARN or alias for --sse aws:kms.
    #[arg(long, env = "TIDEMARK_SSE_KMS_KEY_ID", value_name = "KEY")]
    pub sse_kms_key_id: Option<String>,
}

/// Every store setting: how to reach it ([`StoreAccess`]) and how to write to it
/// ([`StoreWrite`]), for the commands that write (and the config file's `[store]`, whose
/// keys are both structs' fields side by side).
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub access: StoreAccess,
    #[command(flatten)]
    #[serde(flatten)]
    pub write: StoreWrite,
}

fn over<T>(slot: &mut Option<T>, v: Option<T>) {
    if v.is_some() {
        *slot = v;
    }
}

impl StoreAccess {
    /// Puts `flags` (the command line and environment) over these settings (a config file's
    /// `[store]`): each one given there wins.
    pub fn overlay(&mut self, flags: StoreAccess) {
        // Destructured, so that a new field cannot be forgotten here.
        let StoreAccess {
            endpoint_url,
            region,
            path_style,
            request_timeout,
            encryption_key_file,
            encryption_key,
        } = flags;
        over(&mut self.endpoint_url, endpoint_url);
        over(&mut self.region, region);
        self.path_style |= path_style;
        over(&mut self.request_timeout, request_timeout);
        over(&mut self.encryption_key_file, encryption_key_file);
        over(&mut self.encryption_key, encryption_key);
    }

    /// The S3 options for reading: no storage class, no server-side encryption.
    pub fn s3_options(&self) -> Result<S3Options, StoreError> {
        let defaults = S3Options::default();
        let opts = S3Options {
            request_timeout_secs: self
                .request_timeout
                .unwrap_or(defaults.request_timeout_secs),
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.path_style,
            ..defaults
        };
        opts.validate()?;
        Ok(opts)
    }

    /// The encryption key, if one is given: [`StoreAccess::encryption_key`], else the key
    /// file, else `TIDEMARK_ENCRYPTION_KEY`. A file and the variable together are refused.
    pub fn load_encryption_key(&self) -> Result<Option<EncryptionKey>, EncryptionKeyError> {
        if let Some(key) = &self.encryption_key {
            return Ok(Some(key.clone()));
        }
        let from_env = std::env::var(ENCRYPTION_KEY_ENV)
            .ok()
            .map(zeroize::Zeroizing::new)
            .filter(|v| !v.is_empty());
        match (&self.encryption_key_file, from_env) {
            (Some(_), Some(_)) => Err(EncryptionKeyError::Ambiguous),
            (Some(path), None) => EncryptionKey::from_file(path).map(Some),
            (None, Some(text)) => EncryptionKey::parse(&text, ENCRYPTION_KEY_ENV).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Opens the repository at `url` to read it (a missing local directory is not created,
    /// so that a typo is reported). See [`StoreArgs::open`].
    pub async fn open(&self, url: &str) -> Result<Repository, RepoError> {
        open(self, self.s3_options()?, url, false, None).await
    }
}

/// Opens the repository at `url` with these settings.
async fn open(
    access: &StoreAccess,
    s3: S3Options,
    url: &str,
    create: bool,
    max_upload_rate: Option<Rate>,
) -> Result<Repository, RepoError> {
    let key = access
        .load_encryption_key()
        .map_err(|e| StoreError::config(e.to_string()))?;
    open_keyed(s3, url, create, max_upload_rate, key.as_ref()).await
}

/// Opens the repository at `url` with the encryption key `key`.
async fn open_keyed(
    s3: S3Options,
    url: &str,
    create: bool,
    max_upload_rate: Option<Rate>,
    key: Option<&EncryptionKey>,
) -> Result<Repository, RepoError> {
    let url = StoreUrl::parse(url)?;
    let store = open_store_with(
        &url,
        &OpenOptions {
            s3,
            create_local_root: create,
            max_upload_rate,
            ..OpenOptions::default()
        },
    )
    .await?;
    Ok(Repository::open(Arc::clone(&store), key)
        .await?
        .with_url(&url))
}

impl StoreArgs {
    /// Puts `flags` (the command line and environment) over these settings (a config file's
    /// `[store]`): each one given there wins.
    pub fn overlay(&mut self, flags: StoreArgs) {
        // Destructured, so that a new field cannot be forgotten here.
        let StoreArgs { access, write } = flags;
        self.access.overlay(access);
        let StoreWrite {
            storage_class,
            base_storage_class,
            wal_storage_class,
            max_upload_rate,
            sse,
            sse_kms_key_id,
        } = write;
        let w = &mut self.write;
        over(&mut w.storage_class, storage_class);
        over(&mut w.base_storage_class, base_storage_class);
        over(&mut w.wal_storage_class, wal_storage_class);
        over(&mut w.max_upload_rate, max_upload_rate);
        over(&mut w.sse, sse);
        over(&mut w.sse_kms_key_id, sse_kms_key_id);
    }

    /// The S3 options these flags describe.
    pub fn s3_options(&self) -> Result<S3Options, StoreError> {
        let w = &self.write;
        let sse = match (w.sse.as_deref(), &w.sse_kms_key_id) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(StoreError::config(
                    "--sse-kms-key-id needs --sse aws:kms".to_owned(),
                ));
            }
            (Some("AES256"), None) => Some(Sse::Aes256),
            (Some("AES256"), Some(_)) => {
                return Err(StoreError::config(
                    "--sse-kms-key-id goes with --sse aws:kms, not AES256".to_owned(),
                ));
            }
            (Some("aws:kms"), key) => Some(Sse::Kms {
                key_id: key.clone(),
            }),
            (Some(other), _) => {
                return Err(StoreError::config(format!(
                    "--sse {other:?} is not supported: use AES256 or aws:kms"
                )));
            }
        };
        let opts = S3Options {
            storage_class: w.storage_class.clone(),
            base_storage_class: w.base_storage_class.clone(),
            wal_storage_class: w.wal_storage_class.clone(),
            sse,
            ..self.access.s3_options()?
        };
        opts.validate()?;
        Ok(opts)
    }

    /// The encryption key, if one is given (see [`StoreAccess::load_encryption_key`]).
    pub fn load_encryption_key(&self) -> Result<Option<EncryptionKey>, EncryptionKeyError> {
        self.access.load_encryption_key()
    }

    /// Opens the repository at `url`. `create` creates a missing local directory (the
    /// archiver does; the restore tool must not, so that a typo is reported). With an
    /// encryption key, the repository's objects are encrypted (see [`Repository::open`]);
    /// a missing, wrong or unexpected key is refused here, before anything is written.
    pub async fn open(&self, url: &str, create: bool) -> Result<Repository, RepoError> {
        let s3 = self.s3_options()?;
        open(&self.access, s3, url, create, self.write.max_upload_rate).await
    }

    /// [`StoreArgs::open`] with the encryption key given here, never one from these
    /// settings or the environment: for a second repository beside a first (`copy`), whose
    /// key must not be taken from the first's `TIDEMARK_ENCRYPTION_KEY`.
    pub async fn open_with_key(
        &self,
        url: &str,
        create: bool,
        key: Option<&EncryptionKey>,
    ) -> Result<Repository, RepoError> {
        let s3 = self.s3_options()?;
        open_keyed(s3, url, create, self.write.max_upload_rate, key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_take_what_operators_write() {
        for yes in ["1", "true", "TRUE", "yes", "Yes", "on", "ON", " on "] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes:?}");
        }
        for no in ["0", "false", "False", "no", "NO", "off", "Off", ""] {
            assert_eq!(parse_bool(no), Ok(false), "{no:?}");
        }
        for bad in ["maybe", "2", "y e s", "tru"] {
            let e = parse_bool(bad).unwrap_err();
            assert!(
                e.contains("1/0, true/false, yes/no or on/off"),
                "{bad:?}: {e}"
            );
        }
    }

    /// `[store]` keeps its flat keys, and an unknown one is still refused.
    #[test]
    fn the_store_table_is_flat_and_strict() {
        let s: StoreArgs = serde_json::from_value(serde_json::json!({
            "region": "eu-west-1",
            "path_style": true,
            "storage_class": "STANDARD_IA",
            "max_upload_rate": "50MiB/s",
            "request_timeout": 5,
        }))
        .unwrap();
        assert_eq!(s.access.region.as_deref(), Some("eu-west-1"));
        assert!(s.access.path_style);
        assert_eq!(s.access.request_timeout, Some(5));
        assert_eq!(s.write.storage_class.as_deref(), Some("STANDARD_IA"));
        assert!(s.write.max_upload_rate.is_some());
        let e =
            serde_json::from_value::<StoreArgs>(serde_json::json!({"colour": "blue"})).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["region"], "eu-west-1");
        assert_eq!(json["storage_class"], "STANDARD_IA");
    }

    #[test]
    fn flags_win_over_the_file() {
        let mut file: StoreArgs =
            serde_json::from_value(serde_json::json!({"region": "eu-west-1", "sse": "AES256"}))
                .unwrap();
        let mut flags = StoreArgs::default();
        flags.access.region = Some("us-east-2".into());
        flags.write.storage_class = Some("STANDARD".into());
        file.overlay(flags);
        assert_eq!(file.access.region.as_deref(), Some("us-east-2"));
        assert_eq!(file.write.sse.as_deref(), Some("AES256"));
        assert_eq!(file.write.storage_class.as_deref(), Some("STANDARD"));
    }
}

/// The C++ compiler flags RocksDB was built with on x86-64 (`.cargo/config.toml`), if any.
const ROCKSDB_CXXFLAGS: Option<&str> = option_env!("CXXFLAGS_x86_64_unknown_linux_gnu");

/// Refuses a CPU that lacks an instruction set this build's RocksDB was compiled for
/// (`.cargo/config.toml` compiles it with SSE4.2 and PCLMUL on x86-64): without this check
/// the first checksum RocksDB computes would kill the process with SIGILL. The message says
/// what is missing and how to build for such a CPU.
pub fn check_cpu() -> Result<(), String> {
    missing_cpu_features(ROCKSDB_CXXFLAGS.unwrap_or(""), cpu_has).map_or(Ok(()), |missing| {
        Err(format!(
            "this CPU lacks {missing}, which this build of RocksDB uses (it was compiled \
                 with `{}`); run it on an x86-64-v2 CPU (any x86 server since about 2010), or \
                 build Tidemark for this CPU with `CXXFLAGS_x86_64_unknown_linux_gnu=` set to \
                 an empty value",
            ROCKSDB_CXXFLAGS.unwrap_or("")
        ))
    })
}

/// The features `cxxflags` asks for that `has` says the CPU lacks, named, or `None`.
fn missing_cpu_features(cxxflags: &str, has: impl Fn(&str) -> bool) -> Option<String> {
    let missing: Vec<&str> = [("-msse4.2", "SSE4.2"), ("-mpclmul", "PCLMUL")]
        .into_iter()
        .filter(|(flag, _)| cxxflags.split_whitespace().any(|f| f == *flag))
        .filter(|(_, name)| !has(name))
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

#[cfg(target_arch = "x86_64")]
fn cpu_has(name: &str) -> bool {
    match name {
        "SSE4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
        "PCLMUL" => std::arch::is_x86_feature_detected!("pclmulqdq"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_name: &str) -> bool {
    // The flags are for x86-64 only; other targets are built without them.
    true
}

#[cfg(test)]
mod cpu_tests {
    use super::missing_cpu_features;

    #[test]
    fn only_the_features_the_build_asks_for_are_required() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        assert_eq!(missing_cpu_features("", none), None);
        assert_eq!(missing_cpu_features("-O2 -msse4.2 -mpclmul", all), None);
        assert_eq!(
            missing_cpu_features("-msse4.2 -mpclmul", none).as_deref(),
            Some("SSE4.2 and PCLMUL")
        );
        assert_eq!(
            missing_cpu_features("-msse4.2 -mpclmul", |f| f == "SSE4.2").as_deref(),
            Some("PCLMUL")
        );
        assert_eq!(missing_cpu_features("-msse4.1", none), None);
    }

    #[test]
    fn this_machine_runs_this_build() {
        assert_eq!(super::check_cpu(), Ok(()));
    }
}
