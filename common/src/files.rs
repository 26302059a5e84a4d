//! Small files written and read by user-side processes (cluster state,
//! scheduler files) and by the agent (its own state): written atomically,
//! read as regular files with a size bound.

use serde::Serialize;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Write `v` as JSON atomically: a temporary file in the same directory,
/// made `mode`, then renamed over `path`. Readers never see half a file.
pub fn write_json_atomic<T: Serialize>(path: &Path, v: &T, mode: u32) -> io::Result<()> {
    write_atomic(
        path,
        &serde_json::to_vec_pretty(v).map_err(io::Error::other)?,
        mode,
    )
}

/// Write `body` atomically, as `write_json_atomic` does.
pub fn write_atomic(path: &Path, body: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            // The umask may have narrowed the mode at creation, and an old
            // temporary file keeps its own: set it explicitly.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            io::Write::write_all(&mut f, body)
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Read a small regular file, at most `max` bytes. Anything else is an
/// error without blocking or reading further: a FIFO (opened
/// non-blocking), a device such as `/dev/zero`, a directory, or a file
/// larger than `max` (a sparse 100 GB file included).
pub fn read_small_file(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > max as u64 {
        return Err(too_large(path, max));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(max as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(too_large(path, max));
    }
    Ok(buf)
}

fn too_large(path: &Path, max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is larger than {max} bytes", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dsp-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_sets_the_mode_whatever_the_umask() {
        let d = tmpdir("w");
        let p = d.join("a.json");
        write_json_atomic(&p, &serde_json::json!({"a": 1}), 0o600).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["a"], 1);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temporary left"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let d = tmpdir("r");
        let f = d.join("f");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(read_small_file(&f, 5).unwrap(), b"hello");
        assert!(read_small_file(&f, 4).is_err());
        // A sparse file far over the bound is refused from its size.
        let sparse = d.join("sparse");
        std::fs::File::create(&sparse)
            .unwrap()
            .set_len(100 << 30)
            .unwrap();
        assert!(read_small_file(&sparse, 65536).is_err());
        // Devices and directories are refused, FIFOs without blocking.
        assert!(read_small_file(Path::new("/dev/zero"), 65536).is_err());
        assert!(read_small_file(&d, 65536).is_err());
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read_small_file(&fifo, 65536).is_err());
        // A symlink to /dev/zero is followed, then refused.
        let link = d.join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_small_file(&link, 65536).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
