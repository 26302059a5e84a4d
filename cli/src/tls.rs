//! The cluster's TLS credentials, made by its scheduler job as the user:
//! a certificate authority of its own (whose key is thrown away once it
//! signed), and one certificate and key that the scheduler, the workers and
//! the user's clients all present. Peers must present a certificate of that
//! authority, so a cluster accepts only its owner's processes. Files are
//! 0600 in the cluster's 0700 directory.
//!
//! Existing credentials are kept, but only after a look at them (lstat,
//! never following a link): the directory and each file must be the
//! user's own, private, and what they seem (a directory, regular files,
//! not symlinks). Anything else is refused, not repaired: a symlink or a
//! file another user can write would make the cluster trust, or present,
//! credentials that are not the cluster's own.

use dask_spank_common::paths::tls_files;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// How long the credentials are valid: longer than any cluster lives.
const VALIDITY: Duration = Duration::days(3650);

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Make the credentials of cluster `cluster`: (CA certificate, certificate,
/// key), all PEM.
pub fn make(cluster: &str) -> Result<(String, String, String), rcgen::Error> {
    let now = OffsetDateTime::now_utc() - Duration::hours(1);
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = name(&format!("dask-spank cluster {cluster} authority"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (now, now + VALIDITY);
    let ca = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["dask-spank".to_string()])?;
    leaf.distinguished_name = name(&format!("dask-spank cluster {cluster}"));
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    (leaf.not_before, leaf.not_after) = (now, now + VALIDITY);
    let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.pem(), leaf.pem(), key.serialize_pem()))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path)
}

/// What `meta` (from lstat) must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// Why a path with this lstat is not a private directory or file of
/// `uid`, if it is not.
fn not_private(meta: &std::fs::Metadata, kind: Kind, uid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let t = meta.file_type();
    if t.is_symlink() {
        return Some("is a symbolic link".into());
    }
    match kind {
        Kind::Dir if !t.is_dir() => return Some("is not a directory".into()),
        Kind::File if !t.is_file() => return Some("is not a regular file".into()),
        _ => {}
    }
    if meta.uid() != uid {
        return Some(format!(
            "is owned by uid {}, not by you (uid {uid})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Some(format!(
            "has mode {:04o}: group or others have access",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Whether `path` exists, after checking that it is a private `kind` of
/// `uid`; the one-line refusal otherwise.
fn check(path: &Path, kind: Kind, uid: u32) -> Result<bool, String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot look at {}: {e}", path.display())),
    };
    match not_private(&meta, kind, uid) {
        None => Ok(true),
        Some(why) => Err(format!(
            "{} {why}: refusing to use it for the cluster's TLS credentials",
            path.display()
        )),
    }
}

/// The credentials of cluster `cluster` in its directory `dir`: kept if
/// they exist (a new scheduler job of the same cluster keeps its workers'
/// and clients' trust), made otherwise; refused if the directory or an
/// existing file is not private to the user (module doc).
pub fn ensure(dir: &Path, cluster: &str) -> Result<(), String> {
    let uid = nix::unistd::geteuid().as_raw();
    if !check(dir, Kind::Dir, uid)? {
        return Err(format!("{} does not exist", dir.display()));
    }
    let files = tls_files(dir);
    let mut all_exist = true;
    for path in [&files.ca, &files.cert, &files.key] {
        all_exist &= check(path, Kind::File, uid)?;
    }
    if all_exist {
        return Ok(());
    }
    let (ca, cert, key) =
        make(cluster).map_err(|e| format!("cannot make the cluster's TLS credentials: {e}"))?;
    // The key first and the authority last: a worker waiting for the
    // files starts only once all three are there.
    for (path, text) in [(&files.key, &key), (&files.cert, &cert), (&files.ca, &ca)] {
        write_private(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A fresh private directory for one test.
    fn private_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dsp-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn credentials_are_made_once_and_private() {
        let dir = private_dir("made");
        let files = tls_files(&dir);
        ensure(&dir, "ana").unwrap();
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(std::fs::read_to_string(&files.key)
            .unwrap()
            .contains("PRIVATE KEY"));
        for f in [&files.ca, &files.cert, &files.key] {
            assert_eq!(std::fs::metadata(f).unwrap().mode() & 0o777, 0o600);
        }
        ensure(&dir, "ana").unwrap();
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), cert, "kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_among_the_credentials_is_refused_and_left_alone() {
        let dir = private_dir("link");
        let files = tls_files(&dir);
        ensure(&dir, "ana").unwrap();
        let elsewhere = dir.join("elsewhere.key");
        std::fs::rename(&files.key, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &files.key).unwrap();
        let e = ensure(&dir, "ana").unwrap_err();
        assert_eq!(
            e,
            format!(
                "{} is a symbolic link: refusing to use it for the cluster's TLS credentials",
                files.key.display()
            )
        );
        assert!(std::fs::symlink_metadata(&files.key)
            .unwrap()
            .file_type()
            .is_symlink());
        // Missing files are not made either while one is refused.
        std::fs::remove_file(&files.ca).unwrap();
        assert!(ensure(&dir, "ana").is_err());
        assert!(!files.ca.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_others_can_read_are_refused() {
        let dir = private_dir("mode");
        let files = tls_files(&dir);
        ensure(&dir, "ana").unwrap();
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ensure(&dir, "ana").unwrap_err();
        assert!(
            e.starts_with(&format!("{} has mode 0644", files.key.display())),
            "{e}"
        );
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&files.cert).unwrap();
        std::fs::create_dir(&files.cert).unwrap();
        let e = ensure(&dir, "ana").unwrap_err();
        assert!(e.contains("is not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cluster_directory_must_be_a_private_directory() {
        let dir = private_dir("dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = ensure(&dir, "ana").unwrap_err();
        assert!(
            e.starts_with(&format!("{} has mode 0750", dir.display())),
            "{e}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = ensure(&link, "ana").unwrap_err();
        assert!(e.contains("is a symbolic link"), "{e}");
        assert!(
            !tls_files(&dir).key.exists(),
            "nothing made through the link"
        );
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_of_another_owner_are_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give a file to another uid");
            return;
        }
        let dir = private_dir("owner");
        let files = tls_files(&dir);
        ensure(&dir, "ana").unwrap();
        std::os::unix::fs::chown(&files.cert, Some(65534), Some(65534)).unwrap();
        let e = ensure(&dir, "ana").unwrap_err();
        assert!(
            e.starts_with(&format!(
                "{} is owned by uid 65534, not by you (uid 0)",
                files.cert.display()
            )),
            "{e}"
        );
        std::os::unix::fs::chown(&files.cert, Some(0), Some(0)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let e = ensure(&dir, "ana").unwrap_err();
        assert!(e.contains("is owned by uid 65534"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
