//! Store URLs: `s3://BUCKET[/PREFIX]` and `file:///ABSOLUTE/DIR`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::{StoreError, StoreResult};

const ACCEPTED: &str = "use s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR";

/// Where a repository lives, as written on a command line or in a config file.
///
/// Accepted forms:
///
/// - `s3://BUCKET` or `s3://BUCKET/PREFIX` (the prefix may have several segments; a trailing
///   `/` is ignored). Endpoint, region and path style come from
///   [`S3Options`](super::S3Options), never from the URL.
/// - `file:///ABSOLUTE/DIR` (three slashes; `file://localhost/ABSOLUTE/DIR` also works).
///
/// Plain paths are refused on purpose: a typo such as `s3:/bucket` must not silently become
/// a local directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An S3 (or S3-compatible) bucket, optionally under a key prefix.
    S3 {
        /// The bucket name.
        bucket: String,
        /// The key prefix without leading or trailing `/`; empty for the bucket root.
        prefix: String,
    },
    /// A local directory.
    Local {
        /// The directory (absolute).
        root: PathBuf,
    },
}

impl StoreUrl {
    /// Parses a store URL; the error says which forms are accepted.
    pub fn parse(input: &str) -> StoreResult<Self> {
        if input.trim() != input {
            return Err(bad(
                input,
                "it has leading or trailing whitespace; remove it".into(),
            ));
        }
        let Some((scheme, rest)) = input.split_once("://") else {
            return Err(unsupported_without_scheme(input));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "s3" => parse_s3(input, rest),
            "file" => parse_file(input),
            _ => Err(StoreError::config(format!(
                "unsupported store URL '{}': {ACCEPTED}",
                redact(input)
            ))),
        }
    }

    /// A local-directory URL for `root`, which must be absolute.
    pub fn local(root: impl Into<PathBuf>) -> StoreResult<Self> {
        let root = root.into();
        if !root.is_absolute() {
            return Err(StoreError::config(format!(
                "local store directory '{}' is not absolute; give an absolute path",
                root.display()
            )));
        }
        Ok(StoreUrl::Local { root })
    }
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> StoreResult<Self> {
        StoreUrl::parse(s)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::Local { root } => f.write_str(&file_url(root)),
        }
    }
}

/// `file://` URL text for a local directory (percent-encoded where needed).
pub(crate) fn file_url(root: &Path) -> String {
    match ::url::Url::from_file_path(root) {
        Ok(url) => url.to_string(),
        Err(()) => format!("file://{}", root.display()),
    }
}

fn bad(input: &str, reason: String) -> StoreError {
    StoreError::config(format!(
        "invalid store URL '{}': {reason} ({ACCEPTED})",
        redact(input)
    ))
}

/// Splits a URL into what precedes its authority (`scheme://`, or nothing), its userinfo
/// (before the last `@` of the authority, if there is one) and the rest.
fn split_userinfo(input: &str) -> (&str, Option<&str>, &str) {
    let start = input.find("://").map_or(0, |i| i + 3);
    let rest = &input[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => (&input[..start], Some(&rest[..at]), &rest[at + 1..]),
        None => (&input[..start], None, rest),
    }
}

/// Hides a `user:password@` part, should someone put credentials into a URL: every URL a
/// message or log shows passes through here.
pub fn redact(input: &str) -> String {
    match split_userinfo(input) {
        (scheme, Some(_), rest) => format!("{scheme}***@{rest}"),
        _ => input.to_owned(),
    }
}

/// Whether a URL has a `user[:password]@` part.
pub fn has_credentials(input: &str) -> bool {
    split_userinfo(input).1.is_some()
}

/// Refuses an endpoint URL with credentials in it, from wherever it came (`source`: the
/// flag, the AWS configuration); the message shows it redacted.
pub fn refuse_endpoint_credentials(endpoint: &str, source: &str) -> StoreResult<()> {
    if has_credentials(endpoint) {
        return Err(StoreError::config(format!(
            "the endpoint URL {} (from {source}) contains credentials; remove them and use the \
             AWS credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)",
            redact(endpoint)
        )));
    }
    Ok(())
}

fn unsupported_without_scheme(input: &str) -> StoreError {
    let hint = if input.starts_with('/') {
        format!("; for this local directory write file://{input}")
    } else if input.starts_with("s3:") || input.starts_with("file:") {
        "; the scheme must be followed by '://'".to_owned()
    } else {
        "; local directories must be given as absolute file:/// URLs".to_owned()
    };
    StoreError::config(format!(
        "unsupported store URL '{}': {ACCEPTED}{hint}",
        redact(input)
    ))
}

fn parse_s3(input: &str, rest: &str) -> StoreResult<StoreUrl> {
    if rest.contains(['?', '#']) {
        return Err(bad(
            input,
            "query strings and fragments are not allowed; endpoint and region are set with \
             their own options"
                .into(),
        ));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.contains('@') {
        return Err(bad(
            input,
            "credentials must not be written into the URL; use the AWS credential chain \
             (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles)"
                .into(),
        ));
    }
    if bucket.is_empty() {
        return Err(bad(input, "the bucket name is empty".into()));
    }
    validate_bucket(bucket).map_err(|reason| bad(input, format!("bucket '{bucket}' {reason}")))?;
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    if !prefix.is_empty() {
        super::validate_key(prefix).map_err(|e| match e {
            StoreError::InvalidKey { reason, .. } => {
                bad(input, format!("invalid prefix '{prefix}': {reason}"))
            }
            other => other,
        })?;
    }
    Ok(StoreUrl::S3 {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
    })
}

/// S3 bucket naming rules (general-purpose buckets).
fn validate_bucket(bucket: &str) -> Result<(), String> {
    if !(3..=63).contains(&bucket.len()) {
        return Err(format!(
            "is {} characters long; bucket names have 3 to 63 characters",
            bucket.len()
        ));
    }
    if let Some(c) = bucket
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        return Err(format!(
            "contains '{c}'; bucket names use only lowercase letters, digits, '.' and '-'"
        ));
    }
    let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_last_ok(bucket.chars().next()) || !first_last_ok(bucket.chars().last()) {
        return Err("must begin and end with a letter or digit".into());
    }
    if bucket.contains("..") || bucket.contains(".-") || bucket.contains("-.") {
        return Err("must not contain '..', '.-' or '-.'".into());
    }
    if bucket.split('.').count() == 4 && bucket.split('.').all(|p| p.parse::<u8>().is_ok()) {
        return Err("must not be formatted like an IP address".into());
    }
    if bucket.starts_with("xn--") {
        return Err("must not start with 'xn--'".into());
    }
    Ok(())
}

fn parse_file(input: &str) -> StoreResult<StoreUrl> {
    let url = ::url::Url::parse(input).map_err(|e| bad(input, e.to_string()))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            input,
            "query strings and fragments are not allowed".into(),
        ));
    }
    if let Some(host) = url
        .host_str()
        .filter(|h| !h.is_empty() && *h != "localhost")
    {
        return Err(bad(
            input,
            format!(
                "'{host}' is read as a host name; local directories must be absolute and \
                 written with three slashes, e.g. file:///srv/tidemark"
            ),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(input, "user names are not allowed in file URLs".into()));
    }
    let root = url
        .to_file_path()
        .map_err(|()| bad(input, "it does not name an absolute local path".into()))?;
    Ok(StoreUrl::Local { root })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &str) -> String {
        StoreUrl::parse(input).expect_err(input).to_string()
    }

    #[test]
    fn s3_urls() {
        assert_eq!(
            StoreUrl::parse("s3://my-bucket").unwrap(),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://my-bucket/").unwrap(),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        let url = StoreUrl::parse("S3://my.bucket/prod/db1/").unwrap();
        assert_eq!(
            url,
            StoreUrl::S3 {
                bucket: "my.bucket".into(),
                prefix: "prod/db1".into()
            }
        );
        assert_eq!(url.to_string(), "s3://my.bucket/prod/db1");
        assert_eq!(
            "s3://abc/x".parse::<StoreUrl>().unwrap().to_string(),
            "s3://abc/x"
        );
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            StoreUrl::parse("file:///srv/tidemark/").unwrap(),
            StoreUrl::Local {
                root: PathBuf::from("/srv/tidemark")
            }
        );
        assert_eq!(
            StoreUrl::parse("file://localhost/srv/x").unwrap(),
            StoreUrl::Local {
                root: PathBuf::from("/srv/x")
            }
        );
        let url = StoreUrl::parse("file:///srv/with%20space").unwrap();
        assert_eq!(
            url,
            StoreUrl::Local {
                root: PathBuf::from("/srv/with space")
            }
        );
        assert_eq!(url.to_string(), "file:///srv/with%20space");
    }

    #[test]
    fn rejections_say_what_is_accepted() {
        let m = err("ftp://x");
        assert!(
            m.contains("unsupported store URL 'ftp://x'")
                && m.contains("s3://BUCKET[/PREFIX]")
                && m.contains("file:///ABSOLUTE/DIR"),
            "{m}"
        );
        assert!(err("/var/lib/repo").contains("file:///var/lib/repo"));
        assert!(err("repo").contains("unsupported store URL 'repo'"));
        assert!(err("s3:/bucket").contains("'://'"));
        assert!(err("s3://").contains("bucket name is empty"));
        assert!(err("s3:///prefix").contains("bucket name is empty"));
        assert!(err("s3://ab").contains("3 to 63"));
        assert!(err("s3://My_Bucket").contains("lowercase"));
        assert!(err("s3://-abc").contains("begin and end"));
        assert!(err("s3://a..b").contains("'..'"));
        assert!(err("s3://192.168.1.1").contains("IP address"));
        assert!(err("s3://bucket/a//b").contains("invalid prefix"));
        assert!(err("s3://bucket/../x").contains("invalid prefix"));
        assert!(err("s3://bucket?x=1").contains("query"));
        assert!(err("file://relative/dir").contains("three slashes"));
        assert!(err(" s3://bucket").contains("whitespace"));
    }

    #[test]
    fn credentials_in_urls_are_never_echoed() {
        let m = err("s3://AKIAEXAMPLE:secretvalue@bucket/x");
        assert!(
            !m.contains("secretvalue") && !m.contains("AKIAEXAMPLE"),
            "{m}"
        );
        assert!(m.contains("credential chain"), "{m}");
        let m = err("ftp://user:hunter2@host/x");
        assert!(!m.contains("hunter2"), "{m}");
    }

    #[test]
    fn endpoints_with_credentials_are_refused_redacted() {
        for (url, shown) in [
            ("https://user:hunter2@s3.example", "https://***@s3.example"),
            (
                "http://hunter2@127.0.0.1:9000/",
                "http://***@127.0.0.1:9000/",
            ),
            ("user:hunter2@host", "***@host"),
            ("https://a:b@c@host/p?q=@", "https://***@host/p?q=@"),
        ] {
            assert!(has_credentials(url), "{url}");
            assert_eq!(redact(url), shown);
            let m = refuse_endpoint_credentials(url, "AWS_ENDPOINT_URL")
                .unwrap_err()
                .to_string();
            assert!(!m.contains("hunter2") && !m.contains(":b@"), "{m}");
            assert!(m.contains(shown) && m.contains("AWS_ENDPOINT_URL"), "{m}");
        }
        for url in [
            "https://s3.example",
            "http://127.0.0.1:9000/p?x=a@b",
            "host/a@b",
        ] {
            assert!(!has_credentials(url), "{url}");
            assert_eq!(redact(url), url);
            refuse_endpoint_credentials(url, "--endpoint-url").unwrap();
        }
    }

    #[test]
    fn local_constructor_requires_absolute() {
        assert!(StoreUrl::local("relative/dir").is_err());
        assert!(StoreUrl::local("/abs").is_ok());
    }
}
