//! The cluster's TLS credentials, made by its scheduler job as the user:
//! a certificate authority of its own (whose key is thrown away once it
//! signed), and one certificate and key that the scheduler, the workers and
//! the user's clients all present. Peers must present a certificate of that
//! authority, so a cluster accepts only its owner's processes. Files are
//! 0600 in the cluster's 0700 directory.

use dask_spank_common::paths::TlsFiles;
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

/// The cluster's credentials: kept if they exist (a new scheduler job of
/// the same cluster keeps its workers' and clients' trust), made otherwise.
pub fn ensure(files: &TlsFiles, cluster: &str) -> Result<(), String> {
    if files.all_exist() {
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
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn credentials_are_made_once_and_private() {
        let dir = std::env::temp_dir().join(format!("dsp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = dask_spank_common::paths::tls_files(&dir);
        ensure(&files, "ana").unwrap();
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(std::fs::read_to_string(&files.key)
            .unwrap()
            .contains("PRIVATE KEY"));
        for f in [&files.ca, &files.cert, &files.key] {
            assert_eq!(std::fs::metadata(f).unwrap().mode() & 0o777, 0o600);
        }
        ensure(&files, "ana").unwrap();
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), cert, "kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
