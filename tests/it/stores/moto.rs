//! moto, an S3-compatible server from PyPI, started on a free port.
//!
//! `moto_server` is found through `$BACKFORTH_MOTO_SERVER`, `.ci/venv/bin/moto_server` (where
//! `.ci/run` installs it) or `$PATH`; without it these tests fail and say how to install it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

use super::{Emulator, Process};

/// A moto S3 server on 127.0.0.1, stopped on drop.
pub struct Moto {
    process: Process,
}

impl Emulator for Moto {
    fn start(buckets: &[&str]) -> Moto {
        let process = Process::start(
            (
                "BACKFORTH_MOTO_SERVER",
                ".ci/venv/bin/moto_server",
                "moto_server",
            ),
            |port, _| vec!["-H".into(), "127.0.0.1".into(), "-p".into(), port.into()],
            "python3 -m venv .ci/venv && .ci/venv/bin/pip install --no-deps -r .ci/pins/requirements.txt",
        );
        let moto = Moto { process };
        for name in buckets {
            let (status, _) = request(&moto.process.endpoint, "PUT", &format!("/{name}"), &[], "")
                .expect("moto answers");
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        }
        moto
    }

    fn url(&self, bucket: &str, path: &str) -> String {
        format!("s3://{bucket}/{path}")
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        s3_env(&self.process.endpoint, "testing", "testing")
    }

    fn env_denied_reads(&self, bucket: &str, denied: &[&str]) -> Vec<(&'static str, String)> {
        let arns: Vec<String> = denied
            .iter()
            .map(|key| format!("arn:aws:s3:::{bucket}/{key}"))
            .collect();
        let (key, secret) = self.user_who_cannot_read(&arns);
        self.check_permissions(true);
        s3_env(&self.process.endpoint, &key, &secret)
    }

    fn allow_everything(&self) {
        self.check_permissions(false);
    }

    fn endpoint(&self) -> &str {
        &self.process.endpoint
    }

    fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        s3_store(&self.process.endpoint, bucket, "testing")
    }
}

/// The environment that points object_store's S3 client at `endpoint` with these keys.
pub fn s3_env(endpoint: &str, key: &str, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", key.into()),
        ("AWS_SECRET_ACCESS_KEY", secret.into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

/// object_store's client of `bucket` at `endpoint`, with `key` as key id and secret.
pub fn s3_store(endpoint: &str, bucket: &str, key: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id(key)
            .with_secret_access_key(key)
            .build()
            .unwrap(),
    )
}

impl Moto {
    /// One IAM call (moto routes it by the service in the credential scope); the answer's XML.
    fn iam(&self, params: &[(&str, &str)]) -> String {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .append_pair("Version", "2010-05-08")
            .finish();
        let scope = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, \
                     SignedHeaders=host, Signature=unused";
        let (status, body) = request(
            &self.process.endpoint,
            "POST",
            "/",
            &[
                ("Authorization", scope),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &form,
        )
        .expect("moto answers");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
        body
    }

    /// A user allowed everything on S3 except reading `denied` (ARNs of objects); its keys.
    fn user_who_cannot_read(&self, denied: &[String]) -> (String, String) {
        self.iam(&[("Action", "CreateUser"), ("UserName", "reader")]);
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:GetObject", "Resource": denied},
            ]
        });
        self.iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", "reader"),
            ("PolicyName", "no-reads"),
            ("PolicyDocument", &policy.to_string()),
        ]);
        let keys = self.iam(&[("Action", "CreateAccessKey"), ("UserName", "reader")]);
        (
            xml_field(&keys, "AccessKeyId").to_string(),
            xml_field(&keys, "SecretAccessKey").to_string(),
        )
    }

    /// From now on every S3 request must be signed by a known user and allowed by its policy
    /// (`false`: anything goes again, moto's default).
    fn check_permissions(&self, on: bool) {
        let count = if on { "0" } else { "inf" };
        let (status, body) = request(
            &self.process.endpoint,
            "POST",
            "/moto-api/reset-auth",
            &[("Content-Type", "text/plain")],
            count,
        )
        .expect("moto answers");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
    }
}

/// A bare HTTP/1.1 request with headers and a body; returns the status line and the body.
pub fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(String, String)> {
    let addr = endpoint.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    write!(
        stream,
        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.lines().next()?.to_string();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// The text of the first `<tag>...</tag>` in an XML answer.
fn xml_field<'a>(xml: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    &xml[start..start + xml[start..].find('<').unwrap()]
}
