//! The local runtime's working directory: the mesh plan, TLS material, the join key and logs.
//!
//! Layout of `WORKDIR`:
//! - `mesh.json`: the local `MeshPlan` (pretty JSON). Always replaced atomically (temp file in the
//!   same directory, then rename), because media servers watch it and must never read half a plan.
//! - `tls/ca.crt`, `tls/<id>.crt`, `tls/<id>.key`: what a pod finds in its mounted mesh TLS Secret.
//!   The CA's private key is never written: like in a cluster, no server holds it. The runtime keeps
//!   it in memory to issue certificates for servers added later.
//! - `join.key`: the join-token key, the text the `key` entry of the join-key Secret would hold
//!   (fresh, or the named `auth.joinKeySecretRef` Secret's key).
//! - `sip-credentials/username`, `sip-credentials/password`: what a pod finds at
//!   `/etc/chorus/sip-credentials`, copied from the telephony credentials Secret's manifest.
//! - `sip-ca.crt`: the call manager's CA, when the telephony spec names a CA Secret.
//! - `logs/<id>.log`, `logs/bot-<j>.log`: each child's stdout and stderr.
//!
//! Invariant: private keys, the join key and the SIP credentials are created with mode 0600 (the directory holding them
//! 0700), before any content is written, so they are never readable by others, not even briefly.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use chorus_crds::{MeshPlan, TelephonyMode, TelephonySpec, names};
use k8s_openapi::ByteString;
use rand::RngCore as _;

use super::LocalError;
use super::layout::LocalNode;
use super::secrets::LocalSecret;
use crate::plan::ServerCert;
use crate::secret_material::{self, MeshCa};

/// The mesh plan file.
pub const MESH_PLAN_FILE: &str = "mesh.json";
/// The join key file.
pub const JOIN_KEY_FILE: &str = "join.key";
/// The TLS directory.
pub const TLS_DIR: &str = "tls";
/// The log directory.
pub const LOG_DIR: &str = "logs";
/// The directory of the SIP credentials (`username`, `password`).
pub const SIP_CREDENTIALS_DIR: &str = "sip-credentials";
/// The call manager's CA certificate.
pub const SIP_CA_FILE: &str = "sip-ca.crt";

const PRIVATE_FILE: u32 = 0o600;
const PUBLIC_FILE: u32 = 0o644;
const PRIVATE_DIR: u32 = 0o700;

pub(crate) fn io_error(
    what: impl Into<String>,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> LocalError {
    let what = what.into();
    let path = path.to_owned();
    move |source| LocalError::Io { what, path, source }
}

/// A fresh, private directory under the system temp dir: `chorus-<conference>-<random>`.
pub fn fresh_workdir(conference: &str) -> Result<PathBuf, LocalError> {
    let base = std::env::temp_dir();
    // A few tries in case of a name clash; create_dir fails rather than reuse someone's directory.
    let mut last = None;
    for _ in 0..8 {
        let suffix = rand::rng().next_u64();
        let dir = base.join(format!("chorus-{conference}-{suffix:016x}"));
        match create_private_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_error("creating the work directory", &dir)(e)),
        }
    }
    Err(io_error("creating a work directory under", &base)(
        last.unwrap_or_else(|| std::io::Error::other("no unique name found")),
    ))
}

/// Make `dir` (which may exist) and its `tls/` and `logs/` subdirectories.
pub fn prepare_workdir(dir: &Path) -> Result<(), LocalError> {
    fs::create_dir_all(dir).map_err(io_error("creating the work directory", dir))?;
    let tls = dir.join(TLS_DIR);
    match create_private_dir(&tls) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            set_mode(&tls, PRIVATE_DIR).map_err(io_error("restricting", &tls))?;
        }
        Err(e) => return Err(io_error("creating", &tls)(e)),
    }
    let logs = dir.join(LOG_DIR);
    fs::create_dir_all(&logs).map_err(io_error("creating", &logs))?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(PRIVATE_DIR);
    }
    builder.create(dir)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}

/// Write `bytes` to `path` atomically: a temp file next to it (created with `mode`), then rename.
/// A reader sees the old content or the new, never a mix, and never a file with looser permissions.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), LocalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(mode);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_error("writing", path))
}

/// Write the mesh plan to `WORKDIR/mesh.json`, atomically.
pub fn write_mesh_plan(workdir: &Path, plan: &MeshPlan) -> Result<PathBuf, LocalError> {
    let path = workdir.join(MESH_PLAN_FILE);
    let mut text = plan.to_json();
    text.push('\n');
    write_atomic(&path, text.as_bytes(), PUBLIC_FILE)?;
    Ok(path)
}

/// Write a fresh join key to `WORKDIR/join.key` (0600) and return its path.
pub fn write_join_key(workdir: &Path) -> Result<PathBuf, LocalError> {
    let data = secret_material::new_join_key();
    let key = data.get(names::JOIN_KEY_KEY).ok_or_else(|| {
        LocalError::SecretMaterial(format!("new join key has no {:?}", names::JOIN_KEY_KEY))
    })?;
    let path = workdir.join(JOIN_KEY_FILE);
    write_atomic(&path, &key.0, PRIVATE_FILE)?;
    Ok(path)
}

/// Write the join key the Conference names (`auth.joinKeySecretRef`) to `WORKDIR/join.key` (0600).
pub fn write_join_key_value(workdir: &Path, key: &[u8]) -> Result<PathBuf, LocalError> {
    let path = workdir.join(JOIN_KEY_FILE);
    write_atomic(&path, key, PRIVATE_FILE)?;
    Ok(path)
}

/// Where a server that dials phones finds the telephony Secrets' content on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SipFiles {
    /// Holds the files `username` and `password` (0600, in a 0700 directory).
    pub credentials_dir: PathBuf,
    /// The call manager's CA certificate (PEM), when the spec names a CA Secret.
    pub ca_file: Option<PathBuf>,
}

/// Copy the telephony Secrets into the working directory, as a pod's mounts would hold them:
/// `sip-credentials/{username,password}` and `sip-ca.crt`. `None` when the servers dial no
/// phones (no telephony, or edge mode).
pub fn write_sip_files(
    workdir: &Path,
    telephony: Option<&TelephonySpec>,
    secrets: &BTreeMap<String, LocalSecret>,
) -> Result<Option<SipFiles>, LocalError> {
    let Some(t) = telephony.filter(|t| t.mode == TelephonyMode::Server) else {
        return Ok(None);
    };
    let lookup = |name: &str| {
        secrets.get(name).ok_or_else(|| {
            LocalError::SecretMaterial(format!("Secret {name:?} was not read before use"))
        })
    };
    let creds_ref = t.credentials_secret_ref.as_ref().ok_or_else(|| {
        LocalError::Input(
            "telephony in server mode needs credentialsSecretRef (the SIP username and password)"
                .to_owned(),
        )
    })?;
    let creds = lookup(&creds_ref.name)?;
    let purpose = "the SIP credentials (spec.telephony.credentialsSecretRef)";
    let dir = workdir.join(SIP_CREDENTIALS_DIR);
    match create_private_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            set_mode(&dir, PRIVATE_DIR).map_err(io_error("restricting", &dir))?;
        }
        Err(e) => return Err(io_error("creating", &dir)(e)),
    }
    for key in [names::SIP_USERNAME_KEY, names::SIP_PASSWORD_KEY] {
        write_atomic(&dir.join(key), creds.value(key, purpose)?, PRIVATE_FILE)?;
    }
    let ca_file = match &t.ca_secret_ref {
        Some(ca_ref) => {
            let ca = lookup(&ca_ref.name)?;
            let path = workdir.join(SIP_CA_FILE);
            let pem = ca.value(
                names::SIP_CA_KEY,
                "the call manager's CA (spec.telephony.caSecretRef)",
            )?;
            write_atomic(&path, pem, PUBLIC_FILE)?;
            Some(path)
        }
        None => None,
    };
    Ok(Some(SipFiles {
        credentials_dir: dir,
        ca_file,
    }))
}

/// A fresh mesh CA, its certificate written to `WORKDIR/tls/ca.crt`. The CA key stays in memory.
pub fn new_ca(workdir: &Path, conference: &str) -> Result<MeshCa, LocalError> {
    let data = secret_material::new_mesh_ca(conference).map_err(secret_error)?;
    let ca = MeshCa::from_secret_data(&data).map_err(secret_error)?;
    let path = workdir.join(TLS_DIR).join(names::CA_CERT_KEY);
    write_atomic(&path, ca.cert_pem().as_bytes(), PUBLIC_FILE)?;
    Ok(ca)
}

/// Issue a certificate for `node` and write `tls/<id>.crt` and `tls/<id>.key` (0600).
///
/// The certificate is valid for the server id (the name peers verify, as in a cluster) and for its
/// loopback address.
pub fn issue_server_cert(workdir: &Path, ca: &MeshCa, node: &LocalNode) -> Result<(), LocalError> {
    let cert = ServerCert {
        id: node.id.clone(),
        dns_names: vec![node.id.clone(), node.ip.to_string()],
    };
    let issued = ca.issue(&cert).map_err(secret_error)?;
    let dir = workdir.join(TLS_DIR);
    for (file, mode) in [
        (names::server_cert_key(&node.id), PUBLIC_FILE),
        (names::server_key_key(&node.id), PRIVATE_FILE),
    ] {
        let bytes: &ByteString = issued.get(&file).ok_or_else(|| {
            LocalError::SecretMaterial(format!("issued certificate lacks {file}"))
        })?;
        write_atomic(&dir.join(&file), &bytes.0, mode)?;
    }
    Ok(())
}

/// The log file of a child: `WORKDIR/logs/<name>.log`.
pub fn log_path(workdir: &Path, name: &str) -> PathBuf {
    workdir.join(LOG_DIR).join(format!("{name}.log"))
}

/// The last `lines` lines of a log, for error messages ("" when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn secret_error(e: crate::Error) -> LocalError {
    LocalError::SecretMaterial(e.to_string())
}
