//! Official data downloads: MedMNIST v2/v3 files from Zenodo, verified against their official md5s (the
//! table of the `medmnist` package's `info.py`, version 3.0.2).
use anyhow::{Context, Result, anyhow, bail};
use md5::{Digest, Md5};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// (flag, size, md5) of every 2-D MedMNIST file.
pub const TABLE: &[(&str, i64, &str)] = &[
    ("pathmnist", 28, "a8b06965200029087d5bd730944a56c1"),
    ("pathmnist", 64, "55aa9c1e0525abe5a6b9d8343a507616"),
    ("pathmnist", 128, "ac42d08fb904d92c244187169d1fd1d9"),
    ("pathmnist", 224, "2c51a510bcdc9cf8ddb2af93af1eadec"),
    ("chestmnist", 28, "02c8a6516a18b556561a56cbdd36c4a8"),
    ("chestmnist", 64, "9de6cd0b934ebb5b7426cfba5efbae16"),
    ("chestmnist", 128, "db107e5590b27930b62dbaf558aebee3"),
    ("chestmnist", 224, "45bd33e6f06c3e8cdb481c74a89152aa"),
    ("dermamnist", 28, "0744692d530f8e62ec473284d019b0c7"),
    ("dermamnist", 64, "b70a2f5635c6199aeaa28c31d7202e1f"),
    ("dermamnist", 128, "2defd784463fa5243564e855ed717de1"),
    ("dermamnist", 224, "8974907d8e169bef5f5b96bc506ae45d"),
    ("octmnist", 28, "c68d92d5b585d8d81f7112f81e2d0842"),
    ("octmnist", 64, "e229e9440236b774d9f0dfef9d07bdaf"),
    ("octmnist", 128, "0a97e76651ace45c5d943ee3f65b63ae"),
    ("octmnist", 224, "abc493b6d529d5de7569faaef2773ba3"),
    ("pneumoniamnist", 28, "28209eda62fecd6e6a2d98b1501bb15f"),
    ("pneumoniamnist", 64, "8f4eceb4ccffa70c672198ea285246c6"),
    ("pneumoniamnist", 128, "05b46931834c231683c68f40c47b2971"),
    ("pneumoniamnist", 224, "d6a3c71de1b945ea11211b03746c1fe1"),
    ("retinamnist", 28, "bd4c0672f1bba3e3a89f0e4e876791e4"),
    ("retinamnist", 64, "afda852cc34dcda56f86ad2b2457dbcc"),
    ("retinamnist", 128, "e48e916a24454daf90583d4e6efb1a18"),
    ("retinamnist", 224, "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    ("breastmnist", 28, "750601b1f35ba3300ea97c75c52ff8f6"),
    ("breastmnist", 64, "742edef2a1fd1524b2efff4bd7ba9364"),
    ("breastmnist", 128, "363e4b3f8d712e9b5de15470a2aaadf1"),
    ("breastmnist", 224, "b56378a6eefa9fed602bb16d192d4c8b"),
    ("bloodmnist", 28, "7053d0359d879ad8a5505303e11de1dc"),
    ("bloodmnist", 64, "2b94928a2ae4916078ca51e05b6b800b"),
    ("bloodmnist", 128, "adace1e0ed228fccda1f39692059dd4c"),
    ("bloodmnist", 224, "b718ff6835fcbdb22ba9eacccd7b2601"),
    ("tissuemnist", 28, "ebe78ee8b05294063de985d821c1c34b"),
    ("tissuemnist", 64, "123ece2eba09d0aa5d698fda57103344"),
    ("tissuemnist", 128, "61b955355d7425a89687b06cca3ce0c2"),
    ("tissuemnist", 224, "b077128c4a949f0a4eb01517f9037b9c"),
    ("organamnist", 28, "68e3f8846a6bd62f0c9bf841c0d9eacc"),
    ("organamnist", 64, "2dcccc29b88e6da5a01161ef20cda288"),
    ("organamnist", 128, "eeae80d0a227a8d099027e1b3cfd3b60"),
    ("organamnist", 224, "50747347e05c87dd3aaf92c49f9f3170"),
    ("organcmnist", 28, "b9ceb9546e10131b32923c5bbeaea2b1"),
    ("organcmnist", 64, "3ce34a8724ea6f548e6db4744d03b6a9"),
    ("organcmnist", 128, "773c1f009daa3fe5d9a2a201b2a7ed94"),
    ("organcmnist", 224, "050f5e875dc056f6768abf94ec9995d1"),
    ("organsmnist", 28, "9ab87b696fb54e2a387ebe992d6ed5f1"),
    ("organsmnist", 64, "53a6d115339d874c25e309a994ff46d3"),
    ("organsmnist", 128, "ded0c5fa01a95dc4978b956f613e9b8e"),
    ("organsmnist", 224, "b354719e553fbbb2513d5533f52a4cb1"),
];

/// Zenodo's address of a MedMNIST file.
pub fn url(flag: &str, size: i64) -> String {
    if size == 28 {
        format!("https://zenodo.org/records/10519652/files/{flag}.npz?download=1")
    } else {
        format!("https://zenodo.org/records/10519652/files/{flag}_{size}.npz?download=1")
    }
}

/// The md5 of bytes, in hex.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
}

/// Bytes (a digest) as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams the body of `u` into the file `to`, returning its size and md5. A server that does not answer,
/// or stalls, fails after `patience` (per connection, response and read); a trickle that never ends fails
/// after `total`; a body over `max_bytes` is cut off. Never hangs, never holds the file in memory.
pub(crate) fn download(
    u: &str,
    to: &Path,
    patience: Duration,
    total: Duration,
    max_bytes: u64,
) -> Result<(u64, String)> {
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(patience))
        .timeout_recv_response(Some(patience))
        .timeout_per_read(Some(patience))
        .timeout_global(Some(total))
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let resp = agent.get(u).call().map_err(|e| anyhow!("cannot download {u}: {e}"))?;
    let mut reader = resp.into_body().into_reader();
    let mut file = std::fs::File::create(to).with_context(|| format!("{}: cannot create", to.display()))?;
    let (mut hasher, mut n, mut buf) = (Md5::new(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let k = reader.read(&mut buf).map_err(|e| anyhow!("download of {u} broke off after {n} bytes: {e}"))?;
        if k == 0 {
            break;
        }
        n += k as u64;
        if n > max_bytes {
            bail!("download of {u}: more than {max_bytes} bytes, larger than any file it can be; stopped");
        }
        hasher.update(&buf[..k]);
        file.write_all(&buf[..k]).with_context(|| format!("{}: cannot write", to.display()))?;
    }
    file.sync_all().with_context(|| format!("{}: cannot write", to.display()))?;
    Ok((n, hex(&hasher.finalize())))
}

/// Larger than any MedMNIST file (the largest, at 224 px, are a few GB).
const MAX_DOWNLOAD: u64 = 64 << 30;

/// What a fetch did.
pub struct Fetched {
    /// The verified file.
    pub path: PathBuf,
    /// Its md5.
    pub md5: &'static str,
    /// Bytes downloaded (None: it was already there and verified).
    pub downloaded: Option<usize>,
}

/// Downloads MedMNIST's `flag` at `size` px into `dir` (skipped when a verified copy is there), checks
/// the official md5 and writes the file atomically; nothing is written when the check fails.
pub fn medmnist(flag: &str, size: i64, dir: &Path) -> Result<Fetched> {
    let Some(&(_, _, md5)) = TABLE.iter().find(|(f, s, _)| *f == flag && *s == size) else {
        let flags: std::collections::BTreeSet<&str> = TABLE.iter().map(|t| t.0).collect();
        return Err(crate::error::bad_input!(
            "no MedMNIST file '{flag}' at size {size} (flags: {}; sizes 28, 64, 128, 224)",
            flags.into_iter().collect::<Vec<_>>().join(", ")
        ));
    };
    let name = if size == 28 { format!("{flag}.npz") } else { format!("{flag}_{size}.npz") };
    let dest = dir.join(&name);
    if dest.exists() {
        let have = md5_hex(&std::fs::read(&dest).with_context(|| format!("{}: cannot read", dest.display()))?);
        if have == md5 {
            return Ok(Fetched { path: dest, md5, downloaded: None });
        }
        return Err(crate::error::bad_input!(
            "{}: exists but its md5 is {have}, not the official {md5}; remove it to download again",
            dest.display()
        ));
    }
    let u = url(flag, size);
    tracing::info!("downloading {u}");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    // Written under a temporary name and renamed only once verified: a broken download never looks done.
    let tmp = dir.join(format!("{name}.download"));
    let got = download(&u, &tmp, Duration::from_secs(30), Duration::from_secs(12 * 3600), MAX_DOWNLOAD);
    let (n, have) = match got {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            bail!("{e:#} (offline? copy the file into {} by hand)", dir.display());
        }
    };
    if have != md5 {
        let _ = std::fs::remove_file(&tmp);
        bail!("{u}: downloaded file has md5 {have}, not the official {md5}; nothing written");
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("{}: cannot move into place", dest.display()))?;
    Ok(Fetched { path: dest, md5, downloaded: Some(n as usize) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_shipped_files() {
        // The two files shipped in data/ carry the official md5s of the table.
        for (flag, file) in [("breastmnist", "breastmnist.npz"), ("pneumoniamnist", "pneumoniamnist.npz")] {
            let bytes =
                std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(file)).unwrap();
            let want = TABLE.iter().find(|t| t.0 == flag && t.1 == 28).unwrap().2;
            assert_eq!(md5_hex(&bytes), want);
        }
        assert_eq!(TABLE.len(), 48);
        assert!(url("breastmnist", 224).ends_with("breastmnist_224.npz?download=1"));
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts the connection and keeps it open without a byte.
        let _server = std::thread::spawn(move || {
            let conn = listener.accept();
            std::thread::sleep(Duration::from_secs(3));
            drop(conn);
        });
        let t = std::time::Instant::now();
        let to = std::env::temp_dir().join(format!("tpp-fetch-test-{}", std::process::id()));
        let (patience, total) = (Duration::from_millis(500), Duration::from_secs(60));
        let e = download(&format!("http://{addr}/x.npz"), &to, patience, total, 1 << 20).unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
        assert!(e.contains("cannot download") && e.contains("x.npz"), "{e}");
    }

    #[test]
    fn a_body_over_the_cap_is_cut_off_and_a_good_one_streams_to_disk() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = std::thread::spawn(move || {
            for body_len in [3usize << 20, 1000] {
                let (mut conn, _) = listener.accept().unwrap();
                let mut req = [0u8; 4096];
                let _ = conn.read(&mut req);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\nconnection: close\r\n\r\n");
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&vec![7u8; body_len]);
            }
        });
        let to = std::env::temp_dir().join(format!("tpp-fetch-cap-{}", std::process::id()));
        let (patience, total) = (Duration::from_secs(5), Duration::from_secs(60));
        let u = format!("http://{addr}/x.npz");
        let e = download(&u, &to, patience, total, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("more than 1048576 bytes"), "{e}");
        let (n, md5) = download(&u, &to, patience, total, 1 << 20).unwrap();
        assert_eq!((n, md5), (1000, md5_hex(&[7u8; 1000])));
        assert_eq!(std::fs::read(&to).unwrap(), vec![7u8; 1000]);
        let _ = std::fs::remove_file(&to);
    }
}
