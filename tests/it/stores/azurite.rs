//! Azurite, Microsoft's Azure Storage emulator from the npm registry, started on a free port.
//!
//! `azurite-blob` is found through `$BACKFORTH_AZURITE`, `.ci/node/node_modules/.bin/`
//! (where `.ci/run` installs it) or the `PATH`.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStore, ObjectStoreExt};

use super::{Emulator, Process};
use crate::support::util::ok;

/// A running Azurite blob service, stopped when dropped.
pub struct Azurite {
    process: Process,
}

/// Azurite's well-known development account and key.
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Signs requests with the development key (SharedKey) and service SAS tokens, with Python's
/// standard library: `container NAME` creates a container and prints the status;
/// `sas NAME PERMISSIONS` prints a container SAS token.
const SIGN: &str = r#"
import base64, hmac, hashlib, sys, urllib.parse, urllib.request
from email.utils import formatdate
endpoint, account, key, what, container = sys.argv[1:6]
sign = lambda text: base64.b64encode(
    hmac.new(base64.b64decode(key), text.encode(), hashlib.sha256).digest()).decode()
if what == "container":
    date, version = formatdate(usegmt=True), "2021-08-06"
    to_sign = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
               + f"/{account}/{account}/{container}\nrestype:container")
    req = urllib.request.Request(f"{endpoint}/{account}/{container}?restype=container",
        method="PUT", headers={"x-ms-date": date, "x-ms-version": version,
        "Content-Length": "0", "Authorization": f"SharedKey {account}:{sign(to_sign)}"})
    print(urllib.request.urlopen(req).status)
else:
    permissions, expiry, version = sys.argv[6], "2099-01-01T00:00:00Z", "2020-12-06"
    fields = [permissions, "", expiry, f"/blob/{account}/{container}", "", "", "http,https",
              version, "c", "", "", "", "", "", "", ""]
    token = urllib.parse.urlencode({"sv": version, "se": expiry, "sr": "c",
        "sp": permissions, "spr": "http,https", "sig": sign("\n".join(fields))})
    print(token)
"#;

impl Emulator for Azurite {
    fn start(containers: &[&str]) -> Azurite {
        let process = Process::start(
            (
                "BACKFORTH_AZURITE",
                ".ci/node/node_modules/.bin/azurite-blob",
                "azurite-blob",
            ),
            |port, data| {
                [
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    port,
                    "--location",
                    data,
                ]
                .into_iter()
                .chain(["--silent", "--skipApiVersionCheck"])
                .map(String::from)
                .collect()
            },
            "mkdir -p .ci/node && cp .ci/pins/package*.json .ci/node/ && npm ci --prefix .ci/node",
        );
        let azurite = Azurite { process };
        for name in containers {
            assert_eq!(azurite.sign(&["container", name]), "201");
        }
        azurite
    }

    fn url(&self, container: &str, path: &str) -> String {
        format!("az://{container}/{path}")
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.process.endpoint.clone()),
        ]
    }

    /// Azure grants by token rather than by object: the token may add, create, write, delete
    /// and list in the container, and read nothing, `denied` among it.
    fn env_denied_reads(&self, container: &str, _denied: &[&str]) -> Vec<(&'static str, String)> {
        let token = self.sign(&["sas", container, "acwdl"]);
        let mut env = self.env();
        env.push(("AZURE_STORAGE_SAS_KEY", token));
        env
    }

    fn allow_everything(&self) {}

    fn endpoint(&self) -> &str {
        &self.process.endpoint
    }

    fn store(&self, container: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::azure::MicrosoftAzureBuilder::new()
                .with_account(ACCOUNT)
                .with_access_key(KEY)
                .with_endpoint(format!("{}/{ACCOUNT}", self.process.endpoint))
                .with_allow_http(true)
                .with_container_name(container)
                .build()
                .unwrap(),
        )
    }
}

impl Azurite {
    /// Runs [`SIGN`] with `args`; what it printed.
    fn sign(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .args(["-c", SIGN, &self.process.endpoint, ACCOUNT, KEY])
            .args(args)
            .output()
            .unwrap();
        ok(out).trim().to_string()
    }
}

/// The URL forms users write for Azure reach the same container: a run writes through
/// `abfss://container@account.dfs.core.windows.net/`, `sql` reads through
/// `https://account.blob.core.windows.net/container/` and `az://container/`.
#[test]
fn every_azure_url_form_reaches_the_container() {
    let azurite = Azurite::start(&["corpus"]);
    let env = azurite.env();
    let (_dir, job, _server) = super::fixture(Duration::ZERO);
    let abfss = format!("abfss://corpus@{ACCOUNT}.dfs.core.windows.net/forms");
    ok(super::run(
        &env,
        &[
            "run",
            &job,
            "--output",
            &abfss,
            "--endpoint",
            "mock",
            "--stages",
            "candidates",
        ],
    ));
    let query = "SELECT count(*) AS n FROM candidates";
    let https = format!("https://{ACCOUNT}.blob.core.windows.net/corpus/forms");
    let through_https = ok(super::run(&env, &["sql", "--root", &https, query]));
    let through_az = ok(super::run(
        &env,
        &["sql", "--root", "az://corpus/forms", query],
    ));
    assert!(through_https.contains("300"), "{through_https}");
    assert_eq!(through_https, through_az);
    let marker = super::block_on(
        azurite
            .store("corpus")
            .head(&"forms/candidates/_SUCCESS".into()),
    );
    assert!(marker.is_ok(), "{marker:?}");
}
