//! The user's own Secrets in local mode: what a cluster would hold as Secret objects, read from
//! Kubernetes Secret manifests on disk.
//!
//! A Conference names Secrets by name (`auth.joinKeySecretRef`, `telephony.credentialsSecretRef`,
//! `telephony.caSecretRef`). Locally each is the file `<name>.yaml` in one directory (the
//! Conference file's, or `--secrets DIR`), holding an ordinary manifest (`apiVersion: v1`,
//! `kind: Secret`, `metadata.name`, `stringData` and/or base64 `data`), so the same file works with
//! `kubectl apply -f`.
//!
//! Which Secrets and keys are needed comes from the cluster plan's [`SecretPlan::External`]
//! entries: local mode asks for exactly what the operator would check in a cluster.
//!
//! Invariants:
//! - Secret values never appear in an error, a `Debug` rendering or a log line; errors name the
//!   file and the key only.
//! - Like the API server, `stringData` wins over `data` for a key in both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::LocalError;
use crate::plan::{Plan, SecretPlan};

/// One Secret read from its manifest: its name, where it came from, and its keys' values.
pub struct LocalSecret {
    /// The Secret's name (`metadata.name`, also the file's stem).
    pub name: String,
    /// The manifest it was read from.
    pub path: PathBuf,
    data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for LocalSecret {
    /// Names and keys only: a value must not reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSecret")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The manifest file of Secret `name` in `dir`: `dir/<name>.yaml`.
pub fn manifest_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.yaml"))
}

impl LocalSecret {
    /// Read `dir/<name>.yaml`.
    pub fn read(dir: &Path, name: &str) -> Result<Self, LocalError> {
        let path = manifest_path(dir, name);
        let text = std::fs::read_to_string(&path).map_err(|e| LocalError::Secret {
            path: path.clone(),
            message: format!(
                "cannot read the manifest of Secret {name:?} ({e}); write a Kubernetes Secret \
                 manifest named {name:?} there, or point --secrets at the directory holding it"
            ),
        })?;
        Self::parse(&text, &path, name)
    }

    /// Parse a Secret manifest that must be named `name`; `path` is only for messages.
    pub fn parse(text: &str, path: &Path, name: &str) -> Result<Self, LocalError> {
        let error = |message: String| LocalError::Secret {
            path: path.to_owned(),
            message,
        };
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| error(format!("not a YAML document: {e}")))?;
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        let kind = value.get("kind").and_then(|v| v.as_str());
        if api_version != Some("v1") || kind != Some("Secret") {
            return Err(error(format!(
                "expected apiVersion v1 and kind Secret, found {} {}",
                api_version.unwrap_or("<none>"),
                kind.unwrap_or("<none>")
            )));
        }
        let found = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<none>");
        if found != name {
            return Err(error(format!(
                "the Conference names Secret {name:?}, but this manifest is metadata.name {found:?}"
            )));
        }
        // Read by hand rather than through a decoder whose messages may quote the bad value.
        let entries = |field: &str| -> Result<Vec<(String, String)>, LocalError> {
            let Some(map) = value.get(field).filter(|v| !v.is_null()) else {
                return Ok(Vec::new());
            };
            let map = map
                .as_mapping()
                .ok_or_else(|| error(format!("{field} must be a map of key to string")))?;
            map.iter()
                .map(|(k, v)| {
                    let key = k
                        .as_str()
                        .ok_or_else(|| error(format!("{field} has a key that is not a string")))?;
                    let text = v
                        .as_str()
                        .ok_or_else(|| error(format!("{field}.{key} must be a string")))?;
                    Ok((key.to_owned(), text.to_owned()))
                })
                .collect()
        };
        let mut data = BTreeMap::new();
        for (key, encoded) in entries("data")? {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| {
                    error(format!(
                        "data.{key} is not base64 (plain text belongs in stringData)"
                    ))
                })?;
            data.insert(key, bytes);
        }
        for (key, text) in entries("stringData")? {
            data.insert(key, text.into_bytes());
        }
        Ok(Self {
            name: name.to_owned(),
            path: path.to_owned(),
            data,
        })
    }

    /// The value of `key`, or an error naming the file and the key.
    pub fn value(&self, key: &str, purpose: &str) -> Result<&[u8], LocalError> {
        self.data
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| LocalError::Secret {
                path: self.path.clone(),
                message: format!(
                    "Secret {:?} for {purpose} has no key {key:?} (in stringData or data)",
                    self.name
                ),
            })
    }

    /// The keys it holds, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.data.keys().map(String::as_str)
    }
}

/// Every user Secret `plan` needs, read from `dir`, each checked for the keys the plan needs.
pub fn load_all(plan: &Plan, dir: &Path) -> Result<BTreeMap<String, LocalSecret>, LocalError> {
    let mut out = BTreeMap::new();
    for wanted in &plan.secrets {
        let SecretPlan::External {
            name,
            keys,
            purpose,
        } = wanted
        else {
            continue;
        };
        let secret = match out.remove(name) {
            Some(secret) => secret,
            None => LocalSecret::read(dir, name)?,
        };
        for key in keys {
            secret.value(key, purpose)?;
        }
        out.insert(name.clone(), secret);
    }
    Ok(out)
}
