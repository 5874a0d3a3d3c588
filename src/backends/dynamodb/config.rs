//! `dynamodb://TABLE?region=…&endpoint=…` URLs, and the `create-table` command that
//! `dlock schema` prints for administrators.

use crate::duration::parse_duration;
use crate::error::Result;
use crate::location::BackendUrl;
use std::time::Duration;

/// How long one DynamoDB operation (all its attempts) may take unless `?timeout=` says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening one connection may take unless `?connect_timeout=` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const OPTIONS: &[&str] = &[
    "region",
    "endpoint",
    "timeout",
    "connect_timeout",
    "create_table",
];

/// A parsed `dynamodb://` URL.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The URL as given (it holds no credentials: those come from the standard chain).
    pub describe: String,
    /// The table named by the host part.
    pub table: String,
    /// `?region=`; else the standard chain (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// `?endpoint=`: another endpoint than AWS's (a local test server, a VPC endpoint).
    pub endpoint: Option<String>,
    /// `?timeout=`: one whole operation, retries included.
    pub timeout: Duration,
    /// `?connect_timeout=`.
    pub connect_timeout: Duration,
    /// `?create_table=false` turns off creating a missing table.
    pub create_table: bool,
}

impl Settings {
    /// Parses `url`.
    pub fn parse(url: &str) -> Result<Settings> {
        let parsed = BackendUrl::parse(url)?;
        parsed.reject_unknown_options(OPTIONS)?;
        if !parsed.url().username().is_empty() || parsed.url().password().is_some() {
            return Err(parsed.error(
                "credentials do not belong in the URL: dlock takes them from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity, instance roles)",
            ));
        }
        let table = parsed.url().host_str().unwrap_or_default().to_owned();
        if !valid_table_name(&table) {
            return Err(parsed.error(format!(
                "{table:?} is not a DynamoDB table name (3 to 255 of A-Z a-z 0-9 _ - .); expected dynamodb://TABLE?region=us-east-1"
            )));
        }
        if parsed.url().port().is_some() || !matches!(parsed.url().path(), "" | "/") {
            return Err(parsed.error(
                "expected dynamodb://TABLE?region=…; a server address goes into ?endpoint=http://host:port",
            ));
        }
        let duration = |name: &str, default: Duration| -> Result<Duration> {
            match parsed.option(name) {
                None => Ok(default),
                Some(text) => match parse_duration(&text) {
                    Ok(d) if !d.is_zero() => Ok(d),
                    _ => Err(parsed.error(format!(
                        "?{name}={text:?} is not a positive duration (e.g. 5s, 500ms)"
                    ))),
                },
            }
        };
        let timeout = duration("timeout", DEFAULT_TIMEOUT)?;
        let connect_timeout = duration("connect_timeout", DEFAULT_CONNECT_TIMEOUT)?;
        let create_table = match parsed.option("create_table").as_deref() {
            None | Some("true" | "1" | "yes") => true,
            Some("false" | "0" | "no") => false,
            Some(other) => {
                return Err(parsed.error(format!("?create_table={other:?}: expected true or false")))
            }
        };
        let endpoint = parsed.option("endpoint").filter(|e| !e.is_empty());
        if let Some(endpoint) = &endpoint {
            let ok = url::Url::parse(endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(parsed.error(format!(
                    "?endpoint={endpoint:?} is not an http:// or https:// URL"
                )));
            }
        }
        let region = parsed.option("region").filter(|r| !r.is_empty());
        if let Some(region) = &region {
            if !region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(parsed.error(format!("?region={region:?} is not an AWS region name")));
            }
        }
        Ok(Settings {
            describe: parsed.redacted().to_owned(),
            table,
            region,
            endpoint,
            timeout,
            connect_timeout,
            create_table,
        })
    }
}

fn valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The `aws dynamodb create-table` command that makes the table dlock needs: the lock
/// key as partition key, on-demand billing (a lock table's load is bursty and small).
pub fn schema(url: &str) -> Result<String> {
    let settings = Settings::parse(url)?;
    let mut command = format!(
        "# The table of {}: one item per lock key, created by dlock itself when it may.\n\
         aws dynamodb create-table \\\n  --table-name {} \\\n  --attribute-definitions AttributeName=key,AttributeType=S \\\n  --key-schema AttributeName=key,KeyType=HASH \\\n  --billing-mode PAY_PER_REQUEST",
        settings.describe, settings.table
    );
    if let Some(region) = &settings.region {
        command.push_str(&format!(" \\\n  --region {region}"));
    }
    if let Some(endpoint) = &settings.endpoint {
        command.push_str(&format!(
            " \\\n  --endpoint-url '{}'",
            endpoint.replace('\'', "")
        ));
    }
    command.push('\n');
    command.push_str(
        "# dlock needs dynamodb:GetItem, UpdateItem, Scan and DescribeTable on it (CreateTable only to create it).\n",
    );
    Ok(command)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_region_endpoint_and_timeouts() {
        let s = Settings::parse(
            "dynamodb://My_Locks.v2?region=eu-west-1&endpoint=http://127.0.0.1:8000&timeout=2s&connect_timeout=500ms&create_table=false",
        )
        .unwrap();
        assert_eq!(s.table, "My_Locks.v2");
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:8000"));
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.connect_timeout, Duration::from_millis(500));
        assert!(!s.create_table);
        let d = Settings::parse("dynamodb://locks").unwrap();
        assert_eq!(d.timeout, DEFAULT_TIMEOUT);
        assert!(d.create_table && d.region.is_none() && d.endpoint.is_none());
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "dynamodb://",
            "dynamodb://ab",
            "dynamodb://bad$name",
            "dynamodb://locks?colour=red",
            "dynamodb://locks?timeout=0s",
            "dynamodb://locks?endpoint=ftp://x",
            "dynamodb://locks:8000",
            "dynamodb://locks/sub",
            "dynamodb://user:secret@locks",
            "dynamodb://locks?create_table=maybe",
        ] {
            let err = Settings::parse(url).unwrap_err();
            assert!(err.is_usage(), "{url}: {err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn schema_is_a_create_table_command() {
        let text = schema("dynamodb://locks?region=us-east-1").unwrap();
        assert!(text.contains("aws dynamodb create-table"), "{text}");
        assert!(text.contains("--table-name locks"), "{text}");
        assert!(text.contains("AttributeName=key,KeyType=HASH"), "{text}");
        assert!(text.contains("PAY_PER_REQUEST"), "{text}");
        assert!(text.contains("--region us-east-1"), "{text}");
    }
}
