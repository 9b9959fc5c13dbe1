//! File hashing for measurements: SHA-256 at memory speed and never twice
//! for an unchanged file.
//!
//! Owns the digest cache, keyed by (device, inode, size, mtime, ctime) of
//! the open file and dropped for a path when the file watcher reports a
//! change there. Large files are read by a helper thread into two rotating
//! buffers so reading and hashing overlap. Trust boundary: file contents are
//! untrusted bytes; only their digest is kept, and a size cap bounds work.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;

use sha2::{Digest, Sha256};

/// Identity of a file version: any write changes mtime/ctime or size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (ns).
    pub mtime: i128,
    /// Status change time (ns).
    pub ctime: i128,
}

impl FileKey {
    /// The key of an open file.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Why a file was not hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Open, stat or read failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Larger than the configured cap.
    #[error("file is {size} bytes, over the {cap}-byte measurement cap")]
    TooLarge {
        /// Size found.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// Not a regular file.
    #[error("not a regular file")]
    NotAFile,
}

const CHUNK: usize = 4 << 20;

/// SHA-256 of everything `f` yields. Files over one chunk are read by a
/// helper thread while this thread hashes.
pub fn sha256_reader(mut f: impl Read + Send, size_hint: u64) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    if size_hint <= CHUNK as u64 {
        let mut buf = Vec::with_capacity(size_hint as usize + 1);
        f.read_to_end(&mut buf)?;
        h.update(&buf);
        return Ok(h.finalize().into());
    }
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(Vec<u8>, usize)>>(2);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(3);
    for _ in 0..3 {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            while let Ok(mut buf) = empty_rx.recv() {
                let mut filled = 0;
                let res = loop {
                    match f.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                let done = filled < buf.len();
                let msg = res.map(|()| (buf, filled));
                let failed = msg.is_err();
                if full_tx.send(msg).is_err() || done || failed {
                    return;
                }
            }
        });
        loop {
            match full_rx.recv() {
                Ok(Ok((buf, n))) => {
                    h.update(&buf[..n]);
                    let last = n < buf.len();
                    let _ = empty_tx.send(buf);
                    if last {
                        break;
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
        Ok(())
    })?;
    Ok(h.finalize().into())
}

/// A digest cache over file versions.
#[derive(Debug, Default)]
pub struct HashCache {
    map: HashMap<FileKey, [u8; 32]>,
    /// Hashes actually computed (for tests and metrics).
    pub computed: u64,
    /// Cache hits.
    pub hits: u64,
}

impl HashCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes an open file unless this version was hashed before.
    pub fn hash_file(&mut self, f: File, cap: u64) -> Result<([u8; 32], u64), HashError> {
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(HashError::NotAFile);
        }
        let key = FileKey::of(&meta);
        if key.size > cap {
            return Err(HashError::TooLarge {
                size: key.size,
                cap,
            });
        }
        if let Some(d) = self.map.get(&key) {
            self.hits += 1;
            return Ok((*d, key.size));
        }
        // Read at most cap+1 bytes: a file growing while read cannot make
        // us hash without bound.
        let d = sha256_reader(f.take(cap.saturating_add(1)), key.size)?;
        self.computed += 1;
        self.map.insert(key, d);
        Ok((d, key.size))
    }

    /// Drops cached digests of (dev, ino), e.g. after a watcher event.
    pub fn forget_inode(&mut self, dev: u64, ino: u64) {
        self.map.retain(|k, _| !(k.dev == dev && k.ino == ino));
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn large_and_small_match_reference() {
        for size in [0usize, 1, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let want: [u8; 32] = Sha256::digest(&data).into();
            let got = sha256_reader(&data[..], size as u64).unwrap();
            assert_eq!(got, want, "size {size}");
            // Wrong size hints must not change the result.
            assert_eq!(sha256_reader(&data[..], 0).unwrap(), want);
            assert_eq!(sha256_reader(&data[..], u64::MAX).unwrap(), want);
        }
    }

    #[test]
    fn cache_hits_until_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let mut c = HashCache::new();
        let a = c.hash_file(File::open(&p).unwrap(), 1 << 20).unwrap();
        let b = c.hash_file(File::open(&p).unwrap(), 1 << 20).unwrap();
        assert_eq!(a, b);
        assert_eq!((c.computed, c.hits), (1, 1));
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"two").unwrap();
        drop(f);
        let d = c.hash_file(File::open(&p).unwrap(), 1 << 20).unwrap();
        assert_ne!(a, d);
        assert_eq!(c.computed, 2);
        assert!(matches!(
            c.hash_file(File::open(&p).unwrap(), 2),
            Err(HashError::TooLarge { .. })
        ));
    }
}
